"""The parts of Envoy's CheckRequest that the decision reads, in plain Python types."""

from __future__ import annotations

from dataclasses import dataclass

from .api.envoy.service.auth.v3.external_auth_pb2 import CheckRequest

POLICY_EXTENSION = "policy"


@dataclass(frozen=True)
class RequestView:
    """Lower-cased request headers and route settings of one Check call."""

    headers: dict[str, str]
    method: str
    host: str
    path: str
    context_extensions: dict[str, str]

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
    # Envoy sends lower-cased names already; lower-casing again keeps a
    # hand-built request from slipping past the lookup.
    headers = {name.lower(): value for name, value in http.headers.items()}
    return RequestView(
        headers=headers,
        method=http.method,
        host=http.host,
        path=http.path,
        context_extensions=dict(attributes.context_extensions),
    )
