"""The parts of Envoy's CheckRequest that the decision reads, in plain Python types."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .api.envoy.service.auth.v3.external_auth_pb2 import CheckRequest

POLICY_EXTENSION = "policy"


@dataclass(slots=True)
class RequestView:
    """Lower-cased request headers and route settings of one Check call.

    `headers` is any mapping with lower-case names: Envoy's header map as it
    arrives, or a dict. Treat a view as read-only. It is not frozen only
    because a frozen dataclass takes several times longer to build, once per
    Check call.
    """

    headers: Mapping[str, str]
    method: str
    host: str
    path: str
    context_extensions: Mapping[str, str]

    @property
    def request_id(self) -> str:
        return self.headers.get("x-request-id", "")

    @property
    def policy_name(self) -> str | None:
        return self.context_extensions.get(POLICY_EXTENSION)


def view_request(request: CheckRequest) -> RequestView:
    """Build a RequestView; absent parts of the request become empty values."""
    attributes = request.attributes
    http = attributes.request.http
    headers: Mapping[str, str] = http.headers
    # Envoy lower-cases header names, so its map is used as it is, without a
    # copy. A request with an upper-case name was built by hand: lower-case
    # it all, so the lookup of `authorization` cannot miss.
    if "authorization" not in headers and any(name != name.lower() for name in headers):
        headers = {name.lower(): value for name, value in headers.items()}
    return RequestView(
        headers=headers,
        method=http.method,
        host=http.host,
        path=http.path,
        context_extensions=attributes.context_extensions,
    )
