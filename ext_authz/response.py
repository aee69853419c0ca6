"""Turn a Decision into Envoy's CheckResponse."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TypeVar

from google.protobuf.struct_pb2 import Struct
from google.protobuf.wrappers_pb2 import BoolValue

from .api.envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from .api.envoy.service.auth.v3.external_auth_pb2 import (
    CheckResponse,
    DeniedHttpResponse,
)
from .api.envoy.type.v3.http_status_pb2 import HttpStatus
from .claims import claim_value, header_text
from .config import (
    APPLICATION_VALUE,
    CLIENT_ID_VALUE,
    DEFAULT_IDENTITY_HEADERS,
    DenyConfig,
    PolicyConfig,
)
from .decision import Decision
from .policy import Identity
from .reasons import Reason, StatusKind

T = TypeVar("T")

# Client copies of these never reach the upstream, whatever the policy sets.
_DEFAULT_HEADER_NAMES = tuple(name for name, _ in DEFAULT_IDENTITY_HEADERS)

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
        assert decision.policy is not None and decision.identity is not None
        return allow_response(decision.policy, decision.identity)
    return deny_response(decision.reason, decision.policy_name, decision.policy, deny)


def http_status(reason: Reason, deny: DenyConfig) -> int:
    """Return the HTTP status Envoy sends to the client for a deny."""
    return _FIXED_STATUS.get(reason.status_kind, deny.authentication_status)


def upstream_headers(
    policy: PolicyConfig, identity: Identity | None
) -> tuple[list[tuple[str, str]], list[str]]:
    """Return the identity headers to set upstream and the headers to remove.

    With `identity` None (a dry-run deny), every identity header is removed
    and none is set. Removing the ones not set keeps client copies out.
    """
    to_set: list[tuple[str, str]] = []
    if identity is not None:
        for name, source in policy.headers:
            text = header_text(_identity_value(identity, source))
            if text is not None:
                to_set.append((name, text))
    set_names = {name for name, _ in to_set}
    names = dict.fromkeys([*_DEFAULT_HEADER_NAMES, *(name for name, _ in policy.headers)])
    to_remove = [name for name in names if name not in set_names]
    if not policy.forward_token:
        to_remove.append("authorization")
    return to_set, to_remove


def deny_parts(
    reason: Reason, policy_name: str, policy: PolicyConfig | None, deny: DenyConfig
) -> tuple[int, str, str]:
    """Return the HTTP status, the WWW-Authenticate challenge and the JSON body of a deny."""
    challenge = f'Bearer realm="{policy_name}"'
    # RFC 6750 §3.1: a request without credentials gets no error attribute.
    if reason is not Reason.TOKEN_MISSING and reason.error_code is not None:
        challenge += f', error="{reason.error_code}", error_description="{reason.description}"'
    if reason is Reason.SCOPE_INSUFFICIENT and policy is not None:
        challenge += f', scope="{" ".join(policy.required_scopes)}"'
    body = json.dumps({"error": reason.error_code, "error_description": reason.description})
    return http_status(reason, deny), challenge, body


def allow_response(policy: PolicyConfig, identity: Identity | None) -> CheckResponse:
    """Return an OK response that sets the policy's identity headers and removes spoofed ones."""
    to_set, to_remove = upstream_headers(policy, identity)
    response = CheckResponse()
    response.status.code = 0
    ok = response.ok_response
    ok.SetInParent()
    for name, value in to_set:
        option = ok.headers.add()
        option.header.key = name
        option.header.value = value
        # append=false overwrites any copy the client sent.
        option.append.SetInParent()
    ok.headers_to_remove.extend(to_remove)
    if identity is not None:
        _fill_metadata(response.dynamic_metadata, policy, identity)
    return response


def deny_response(
    reason: Reason, policy_name: str, policy: PolicyConfig | None, deny: DenyConfig
) -> CheckResponse:
    status, challenge, body = deny_parts(reason, policy_name, policy, deny)
    denied = DeniedHttpResponse(
        status=HttpStatus(code=status),  # type: ignore[arg-type]
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


def rendered_allow(decision: Decision, front_end: str, render: Callable[[Decision], T]) -> T:
    """Return the allow response for `decision`, rendered once per verification and policy.

    The identity of an allow is a function of the verified claims, the
    policy and the configuration the policy object belongs to (a reload makes
    new policy objects). So while the verified-token cache keeps a token's
    verification, its allow response for one policy is always the same and is
    reused. The decision itself, with the time checks, is made on every call.
    """
    memo, policy = decision.rendered, decision.policy
    if memo is None:
        return render(decision)
    key = (id(policy), front_end)
    entry = memo.get(key)
    # The policy object is kept in the entry, so its id cannot be reused.
    if entry is not None and entry[0] is policy:
        return entry[1]  # type: ignore[no-any-return]
    response = render(decision)
    memo[key] = (policy, response)
    return response


def _identity_value(identity: Identity, source: str) -> object:
    if source == APPLICATION_VALUE:
        return identity.application
    if source == CLIENT_ID_VALUE:
        return identity.client_id
    return claim_value(identity.claims, source)


def _fill_metadata(metadata: Struct, policy: PolicyConfig, identity: Identity) -> None:
    """Fill the dynamic metadata Envoy stores under envoy.filters.http.ext_authz."""
    fields = metadata.fields
    fields["policy"].string_value = policy.name
    fields["issuer"].string_value = identity.issuer.name
    fields["subject"].string_value = identity.subject or ""
    fields["client_id"].string_value = identity.client_id or ""
    fields["application"].string_value = identity.application or ""
    scopes = fields["scopes"].list_value
    scopes.SetInParent()
    for scope in identity.scopes:
        scopes.values.add().string_value = scope


def _header(name: str, value: str) -> HeaderValueOption:
    # append=false overwrites any copy the client sent.
    return HeaderValueOption(
        header=HeaderValue(key=name, value=value), append=BoolValue(value=False)
    )
