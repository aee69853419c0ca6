"""Find the bearer token in the request (RFC 6750 §2.1)."""

from __future__ import annotations

from .reasons import Reason
from .request_view import RequestView

AUTHORIZATION = "authorization"
# Room for the scheme and surrounding spaces in the length check of the raw header.
_SCHEME_ALLOWANCE = 64


class CredentialError(Exception):
    """The request has no usable bearer token, for the cause in `reason`."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def bearer_token(view: RequestView, max_length: int) -> str:
    """Return the token from `Authorization: Bearer <token>`.

    The scheme is matched case-insensitively (RFC 7235 §2.1) and may be
    followed by one or more spaces. Envoy joins repeated headers with ',', and
    ',' is not a token68 character, so a comma means two Authorization headers.
    Tokens in the query string are ignored: they end up in access logs.
    A value longer than `max_length` plus the scheme is rejected before any
    parsing, so a huge header costs no more than a length check.
    """
    value = view.headers.get(AUTHORIZATION)
    if value is None or not value.strip():
        raise CredentialError(Reason.TOKEN_MISSING, "no Authorization header")
    if len(value) > max_length + _SCHEME_ALLOWANCE:
        raise CredentialError(
            Reason.TOKEN_MALFORMED,
            f"the Authorization header is longer than {max_length} characters "
            "(server.max_token_length)",
        )

    scheme, _, rest = value.strip(" ").partition(" ")
    if scheme.lower() != "bearer":
        if scheme.lower().startswith("bearer"):
            raise CredentialError(Reason.TOKEN_MALFORMED, "no space after the Bearer scheme")
        raise CredentialError(Reason.TOKEN_MISSING, "the Authorization scheme is not Bearer")

    token = rest.lstrip(" ")
    if not token:
        raise CredentialError(Reason.TOKEN_MALFORMED, "the Bearer scheme has no token")
    if "," in value:
        raise CredentialError(Reason.TOKEN_MALFORMED, "more than one Authorization header")
    if any(character in token for character in " \t\r\n"):
        raise CredentialError(Reason.TOKEN_MALFORMED, "the Bearer value has more than one part")
    if len(token) > max_length:
        raise CredentialError(
            Reason.TOKEN_MALFORMED,
            f"the token is longer than {max_length} characters (server.max_token_length)",
        )
    return token
