"""Policy checks on a verified token: time, audience, client application and scopes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .claims import ClaimError, check_time_and_audience, client_id, granted_scopes
from .config import Config, IssuerConfig, PolicyConfig
from .reasons import Reason


@dataclass(slots=True)
class Identity:
    """The caller's identity, established by a token that passed every check."""

    issuer: IssuerConfig
    claims: dict[str, Any]
    client_id: str | None
    application: str | None
    scopes: tuple[str, ...]

    @property
    def subject(self) -> str | None:
        sub = self.claims.get("sub")
        return sub if isinstance(sub, str) else None


def apply_policy(
    policy: PolicyConfig,
    config: Config,
    issuer: IssuerConfig,
    claims: dict[str, Any],
    now: float,
) -> Identity:
    """Return the caller's identity, or raise ClaimError naming the failed check."""
    audiences = policy.audiences or issuer.audiences
    check_time_and_audience(claims, audiences, issuer.leeway_seconds, now)

    client = client_id(claims, issuer.client_id_claims)
    application = config.application_for(client) if client is not None else None
    if policy.applications is not None and (
        application is None or application.name not in policy.applications
    ):
        raise ClaimError(
            Reason.CLIENT_NOT_ALLOWED,
            "the client id is not registered by an application this policy allows"
            if client is not None
            else "the token carries no client id",
        )

    scopes = granted_scopes(claims)
    missing = [scope for scope in policy.required_scopes if scope not in scopes]
    if missing:
        raise ClaimError(Reason.SCOPE_INSUFFICIENT, f"missing scopes: {' '.join(missing)}")

    return Identity(
        issuer=issuer,
        claims=claims,
        client_id=client,
        application=application.name if application is not None else None,
        scopes=scopes,
    )
