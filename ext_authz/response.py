"""Turn a Decision into Envoy's CheckResponse."""

from __future__ import annotations

import json

from google.protobuf.wrappers_pb2 import BoolValue

from .api.envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from .api.envoy.service.auth.v3.external_auth_pb2 import (
    CheckResponse,
    DeniedHttpResponse,
    OkHttpResponse,
)
from .api.envoy.type.v3.http_status_pb2 import HttpStatus
from .config import DenyConfig
from .decision import Decision
from .reasons import Reason, StatusKind

# Identity headers the upstream may trust: set from the verified token, and
# removed when the client sent them but the token has no such value.
ISSUER_HEADER = "x-auth-issuer"
SUBJECT_HEADER = "x-auth-subject"
CLIENT_ID_HEADER = "x-auth-client-id"

# google.rpc.Code values (google/rpc/code.proto).
_GRPC_CODE = {
    StatusKind.AUTHENTICATION: 16,  # UNAUTHENTICATED
    StatusKind.FORBIDDEN: 7,  # PERMISSION_DENIED
    StatusKind.UNAVAILABLE: 14,  # UNAVAILABLE
    StatusKind.INTERNAL: 13,  # INTERNAL
}
_FIXED_STATUS = {StatusKind.FORBIDDEN: 403, StatusKind.UNAVAILABLE: 503, StatusKind.INTERNAL: 500}


def build_response(decision: Decision, deny: DenyConfig) -> CheckResponse:
    if decision.allowed:
        return _allow(decision)
    return _deny(decision.reason, decision.policy, deny)


def http_status(reason: Reason, deny: DenyConfig) -> int:
    """Return the HTTP status Envoy sends to the client for a deny."""
    return _FIXED_STATUS.get(reason.status_kind, deny.authentication_status)


def _allow(decision: Decision) -> CheckResponse:
    identity = {
        ISSUER_HEADER: decision.issuer_url,
        SUBJECT_HEADER: decision.subject,
        CLIENT_ID_HEADER: decision.client_id,
    }
    ok = OkHttpResponse()
    for name, value in identity.items():
        if value is not None and _is_header_safe(value):
            ok.headers.append(_header(name, value))
        else:
            ok.headers_to_remove.append(name)

    response = CheckResponse(ok_response=ok)
    response.status.code = 0
    return response


def _deny(reason: Reason, policy: str, deny: DenyConfig) -> CheckResponse:
    challenge = f'Bearer realm="{policy}"'
    # RFC 6750 §3.1: a request without credentials gets no error attribute.
    if reason is not Reason.TOKEN_MISSING and reason.error_code is not None:
        challenge += f', error="{reason.error_code}", error_description="{reason.description}"'
    body = json.dumps({"error": reason.error_code, "error_description": reason.description})

    denied = DeniedHttpResponse(
        status=HttpStatus(code=http_status(reason, deny)),  # type: ignore[arg-type]
        headers=[
            _header("www-authenticate", challenge),
            _header("content-type", "application/json"),
        ],
        body=body,
    )
    response = CheckResponse(denied_response=denied)
    response.status.code = _GRPC_CODE[reason.status_kind]
    response.status.message = reason.label
    return response


def _header(name: str, value: str) -> HeaderValueOption:
    # append=false overwrites any copy the client sent.
    return HeaderValueOption(
        header=HeaderValue(key=name, value=value), append=BoolValue(value=False)
    )


def _is_header_safe(value: str) -> bool:
    """Return whether a claim value is visible ASCII and can go into a header as is."""
    return value.isascii() and value.isprintable() and len(value) <= 4096
