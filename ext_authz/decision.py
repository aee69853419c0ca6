"""The outcome of one Check call, as a plain value."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .reasons import Reason

# Claims that carry the OAuth client id, in order of preference: RFC 9068
# `client_id`, Okta's `cid`, and OIDC's authorized party `azp` (Keycloak, Entra ID).
CLIENT_ID_CLAIMS = ("client_id", "cid", "azp")


@dataclass(frozen=True)
class Decision:
    """Allow or deny, with one reason, and the verified identity when there is one."""

    reason: Reason
    policy: str
    detail: str = ""
    issuer_name: str | None = None
    claims: dict[str, Any] = field(default_factory=dict)

    @property
    def allowed(self) -> bool:
        return self.reason is Reason.OK

    @property
    def subject(self) -> str | None:
        return _string_claim(self.claims, "sub")

    @property
    def issuer_url(self) -> str | None:
        return _string_claim(self.claims, "iss")

    @property
    def client_id(self) -> str | None:
        for name in CLIENT_ID_CLAIMS:
            value = _string_claim(self.claims, name)
            if value is not None:
                return value
        return None


def _string_claim(claims: dict[str, Any], name: str) -> str | None:
    value = claims.get(name)
    return value if isinstance(value, str) else None
