"""Deny reasons: one stable label per outcome of a Check call.

Metrics, logs and docs use the label. The error code goes into the
`WWW-Authenticate` challenge (RFC 6750 §3.1) and the JSON body. Codes that
RFC 6750 does not define come from RFC 6749 §4.1.2.1 (`access_denied`,
`server_error`, `temporarily_unavailable`). Descriptions reach the caller, so they are fixed
sentences that never echo the token or the configuration.
"""

from __future__ import annotations

import enum


class StatusKind(enum.Enum):
    """Rule that picks the HTTP status of a deny reason."""

    AUTHENTICATION = "authentication"  # deny.authentication_status (403 by default)
    FORBIDDEN = "forbidden"  # always 403
    UNAVAILABLE = "unavailable"  # always 503
    INTERNAL = "internal"  # always 500


class Reason(enum.Enum):
    """Outcome of a Check call. `OK` is the only allowing reason."""

    OK = ("ok", None, StatusKind.AUTHENTICATION, "The token is valid.")
    TOKEN_MISSING = (
        "token_missing",
        "invalid_request",
        StatusKind.AUTHENTICATION,
        "The request carries no bearer token.",
    )
    TOKEN_MALFORMED = (
        "token_malformed",
        "invalid_token",
        StatusKind.AUTHENTICATION,
        "The bearer token or Authorization header is malformed.",
    )
    TOKEN_EXPIRED = (
        "token_expired",
        "invalid_token",
        StatusKind.AUTHENTICATION,
        "The token has expired.",
    )
    TOKEN_NOT_YET_VALID = (
        "token_not_yet_valid",
        "invalid_token",
        StatusKind.AUTHENTICATION,
        "The token is not valid yet.",
    )
    SIGNATURE_INVALID = (
        "signature_invalid",
        "invalid_token",
        StatusKind.AUTHENTICATION,
        "The token signature is invalid.",
    )
    ALGORITHM_NOT_ALLOWED = (
        "algorithm_not_allowed",
        "invalid_token",
        StatusKind.AUTHENTICATION,
        "The token is signed with an algorithm that is not allowed.",
    )
    ISSUER_UNTRUSTED = (
        "issuer_untrusted",
        "invalid_token",
        StatusKind.AUTHENTICATION,
        "The token issuer is not trusted for this API.",
    )
    AUDIENCE_MISMATCH = (
        "audience_mismatch",
        "invalid_token",
        StatusKind.AUTHENTICATION,
        "The token audience is not accepted by this API.",
    )
    KEY_NOT_FOUND = (
        "key_not_found",
        "invalid_token",
        StatusKind.AUTHENTICATION,
        "No signing key of the issuer matches the token.",
    )
    TOKEN_INACTIVE = (
        "token_inactive",
        "invalid_token",
        StatusKind.AUTHENTICATION,
        "The token is not active.",
    )
    CLIENT_NOT_ALLOWED = (
        "client_not_allowed",
        "access_denied",
        StatusKind.FORBIDDEN,
        "The client application is not allowed to call this API.",
    )
    SCOPE_INSUFFICIENT = (
        "scope_insufficient",
        "insufficient_scope",
        StatusKind.FORBIDDEN,
        "The token lacks a scope this API requires.",
    )
    INTROSPECTION_FAILED = (
        "introspection_failed",
        "temporarily_unavailable",
        StatusKind.UNAVAILABLE,
        "The token could not be checked with its issuer; retry later.",
    )
    KEYS_UNAVAILABLE = (
        "keys_unavailable",
        "temporarily_unavailable",
        StatusKind.UNAVAILABLE,
        "The issuer's signing keys are unavailable; retry later.",
    )
    POLICY_UNKNOWN = (
        "policy_unknown",
        "access_denied",
        StatusKind.FORBIDDEN,
        "No access policy is configured for this route.",
    )
    INTERNAL_ERROR = (
        "internal_error",
        "server_error",
        StatusKind.INTERNAL,
        "The authorization service failed to process the request.",
    )

    def __init__(
        self, label: str, error_code: str | None, status_kind: StatusKind, description: str
    ) -> None:
        self.label = label
        self.error_code = error_code
        self.status_kind = status_kind
        self.description = description

    def __str__(self) -> str:
        return self.label
