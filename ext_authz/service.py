"""The Authorization servicer: one Check call through the decision pipeline."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import grpc

from .api.envoy.service.auth.v3 import external_auth_pb2_grpc
from .api.envoy.service.auth.v3.external_auth_pb2 import CheckRequest, CheckResponse
from .config import Config
from .credential import CredentialError, bearer_token
from .decision import Decision
from .issuer_keys import IssuerKeys
from .metrics import Metrics
from .reasons import Reason
from .request_view import RequestView, view_request
from .response import build_response, http_status
from .verify import VerificationError, Verifier

log = logging.getLogger(__name__)

# Metric and log label for a request whose policy name is not configured.
# Configured names start with a letter or digit, so this one cannot clash.
UNKNOWN_POLICY = "_unknown"


class AuthorizationService(external_auth_pb2_grpc.AuthorizationServicer):
    """Envoy's Authorization service. Every input gets a CheckResponse, never a gRPC error."""

    def __init__(
        self, config: Config, issuer_keys: Mapping[str, IssuerKeys], metrics: Metrics
    ) -> None:
        self._config = config
        self._metrics = metrics
        self._verifier = Verifier(issuer_keys)

    def Check(self, request: CheckRequest, context: grpc.ServicerContext) -> CheckResponse:
        started = time.perf_counter()
        view: RequestView | None = None
        try:
            view = view_request(request)
            decision = self.decide(view)
            response = build_response(decision, self._config.deny)
        except Exception:
            log.exception("Check failed with an unexpected error; denying the request")
            decision = Decision(Reason.INTERNAL_ERROR, UNKNOWN_POLICY, "unexpected error")
            response = build_response(decision, self._config.deny)

        self._record(decision, view)
        self._metrics.check_duration.observe(time.perf_counter() - started)
        return response

    def decide(self, view: RequestView) -> Decision:
        """Run the pipeline: policy, credential, verification."""
        policy_name = view.policy_name or self._config.default_policy
        policy = self._config.policy(policy_name)
        if policy is None:
            # The name comes from Envoy's route configuration, not from the
            # client, so the log may show it; the response body does not.
            return Decision(
                Reason.POLICY_UNKNOWN,
                UNKNOWN_POLICY,
                f"no policy named {policy_name[:100]!r} is configured; fix the route's "
                "context_extensions or add the policy",
            )

        try:
            token = bearer_token(view)
        except CredentialError as error:
            return Decision(error.reason, policy.name, error.detail)

        try:
            verified = self._verifier.verify(token, policy.issuers)
        except VerificationError as error:
            return Decision(
                error.reason,
                policy.name,
                error.detail,
                issuer_name=error.issuer.name if error.issuer else None,
                claims=error.claims or {},
            )
        return Decision(
            Reason.OK, policy.name, issuer_name=verified.issuer.name, claims=verified.claims
        )

    def _record(self, decision: Decision, view: RequestView | None) -> None:
        outcome = "allow" if decision.allowed else "deny"
        self._metrics.decisions.labels(decision.policy, outcome, decision.reason.label).inc()
        if decision.allowed:
            return
        log.info(
            "denied request: policy=%s reason=%s status=%d issuer=%s client_id=%s request_id=%s "
            "detail=%s",
            decision.policy,
            decision.reason.label,
            http_status(decision.reason, self._config.deny),
            decision.issuer_name or "-",
            decision.client_id or "-",
            view.request_id if view else "-",
            decision.detail,
            extra={
                "policy": decision.policy,
                "reason": decision.reason.label,
                "issuer": decision.issuer_name,
                "client_id": decision.client_id,
                "request_id": view.request_id if view else None,
                "detail": decision.detail,
            },
        )
