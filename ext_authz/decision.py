"""The outcome of one Check call, as a plain value."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config import PolicyConfig
from .policy import Identity
from .reasons import Reason


@dataclass(slots=True)
class Decision:
    """Allow or deny with one reason; an allow carries the caller's identity."""

    reason: Reason
    policy_name: str
    policy: PolicyConfig | None = None
    detail: str = ""
    identity: Identity | None = None
    # Known once the token's signature verified, so logs may name the caller.
    issuer_name: str | None = None
    client_id: str | None = None
    # The verification's memo of rendered allow responses (VerifiedToken.rendered).
    rendered: dict[tuple[int, str], tuple[Any, Any]] | None = None

    @property
    def allowed(self) -> bool:
        return self.reason is Reason.OK
