"""`ext-authz explain`: run the decision pipeline offline for one token and show every check."""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

from .config import Config
from .credential import AUTHORIZATION
from .decision import Decision
from .issuer_keys import IssuerKeys
from .metrics import Metrics
from .reasons import Reason
from .request_view import POLICY_EXTENSION, RequestView
from .response import http_status
from .service import DecisionEngine, Step
from .token import MalformedTokenError, parse_token

EXIT_ALLOW = 0
EXIT_DENY = 1


def explain(config: Config, token: str, policy_name: str | None, out: TextIO = sys.stdout) -> int:
    """Print how the service decides on `token` and return 0 for allow, 1 for deny."""
    metrics = Metrics()
    chosen = config.policy(policy_name or config.default_policy)
    trusted = chosen.issuers if chosen is not None else ()

    # Fetch keys now, as the service does at start-up, for the issuers that matter.
    issuer_keys = {issuer.name: IssuerKeys(issuer, metrics) for issuer in config.issuers}
    for name in trusted:
        keys = issuer_keys[name]
        if not keys.refresh():
            print(f"note: keys of issuer {name} not loaded: {keys.state().last_error}", file=out)

    view = RequestView(
        headers={AUTHORIZATION: f"Bearer {token}"},
        method="GET",
        host="",
        path="/",
        context_extensions={POLICY_EXTENSION: policy_name} if policy_name else {},
    )
    steps: list[Step] = []
    decision = DecisionEngine(config, issuer_keys, metrics).decide(view, steps)

    print(f"policy:  {decision.policy_name}", file=out)
    if decision.issuer_name is not None:
        issuer = config.issuer(decision.issuer_name)
        print(f"issuer:  {issuer.name} ({issuer.issuer})", file=out)
    print("checks:", file=out)
    for step in steps:
        print(f"  [{'pass' if step.passed else 'FAIL'}] {step.name}: {step.detail}", file=out)
    if decision.allowed:
        identity = decision.identity
        assert identity is not None
        print("result:  allow", file=out)
        print(
            f"client:  {identity.client_id or '-'} (application {identity.application or '-'})",
            file=out,
        )
        print(f"scopes:  {' '.join(identity.scopes) or '-'}", file=out)
    else:
        status = http_status(decision.reason, config.deny)
        dry_run = (
            " (dry run: the request would still be allowed)"
            if (decision.policy is not None and decision.policy.dry_run)
            else ""
        )
        print(f"result:  deny, reason {decision.reason.label}, HTTP {status}{dry_run}", file=out)

    claims, verified = _claims_for_display(decision, token)
    label = "claims:" if verified else "claims (unverified):"
    print(label, file=out)
    print(json.dumps(claims, indent=2, sort_keys=True, default=str) if claims else "  -", file=out)
    print(f"token:   {_redacted(token)}", file=out)
    return EXIT_ALLOW if decision.reason is Reason.OK else EXIT_DENY


def _claims_for_display(decision: Decision, token: str) -> tuple[dict[str, Any] | None, bool]:
    """Return the claims to print and whether the issuer vouched for them."""
    if decision.identity is not None:
        return decision.identity.claims, True
    try:
        claims = parse_token(token).claims
    except MalformedTokenError:
        return None, False
    # A deny that names an issuer came after the signature verified.
    return claims, decision.issuer_name is not None


def _redacted(token: str) -> str:
    """Return a token shortened so that it cannot be replayed from the output."""
    if len(token) <= 16:
        return f"(redacted, {len(token)} characters)"
    return f"{token[:8]}...(redacted, {len(token)} characters)"
