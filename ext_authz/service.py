"""The Authorization servicer: one Check call through the decision pipeline."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from .api.envoy.service.auth.v3 import external_auth_pb2_grpc
from .api.envoy.service.auth.v3.external_auth_pb2 import CheckRequest, CheckResponse
from .claims import ClaimError, client_id
from .config import Config, DenyConfig, PolicyConfig
from .credential import CredentialError, bearer_token
from .decision import Decision
from .introspection import Introspector
from .issuer_keys import IssuerKeys
from .metrics import Metrics
from .policy import apply_policy
from .reasons import Reason
from .request_view import RequestView, view_request
from .response import allow_response, build_response, http_status, rendered_allow
from .tracing import CheckTracer
from .verify import VerificationError, VerifiedToken, Verifier, WaitNeeded

log = logging.getLogger(__name__)

# Metric and log label for a request whose policy name is not configured.
# Configured names start with a letter or digit, so this one cannot clash.
UNKNOWN_POLICY = "_unknown"


@dataclass(frozen=True)
class Step:
    """One check of the pipeline and its outcome, as `ext-authz explain` prints it."""

    name: str
    passed: bool
    detail: str


class DecisionEngine:
    """Runs the decision pipeline: policy, credential, verification, policy checks."""

    def __init__(
        self,
        config: Config,
        issuer_keys: Mapping[str, IssuerKeys],
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
        previous: DecisionEngine | None = None,
    ) -> None:
        self.config = config
        self._verifier = Verifier(issuer_keys, config.server.verified_token_cache_size)
        self._clock = clock
        # After a reload, an issuer whose settings did not change keeps its
        # introspection cache.
        kept = previous.introspectors if previous is not None else {}
        self.introspectors = {
            issuer.name: (
                kept[issuer.name]
                if issuer.name in kept and kept[issuer.name].config == issuer
                else Introspector(issuer, metrics)
            )
            for issuer in config.issuers
            if issuer.introspection is not None
        }

    def decide(
        self, view: RequestView, steps: list[Step] | None = None, may_wait: bool = True
    ) -> Decision:
        """Return the decision for one request; `steps` collects each check when given.

        With `may_wait=False` it raises WaitNeeded instead of waiting on the
        network (a key refetch or an introspection request).
        """
        policy_name = view.policy_name or self.config.default_policy
        policy = self.config.policy(policy_name)
        if policy is None:
            # The name comes from Envoy's route configuration, not from the
            # client, so the log may show it; the response body does not.
            detail = (
                f"no policy named {policy_name[:100]!r} is configured; fix the route's "
                "context_extensions or add the policy"
            )
            _note(steps, "policy", False, detail)
            return Decision(Reason.POLICY_UNKNOWN, UNKNOWN_POLICY, detail=detail)
        if steps is not None:
            _note(steps, "policy", True, f"policy {policy.name!r}")

        try:
            token = bearer_token(view, self.config.server.max_token_length)
        except CredentialError as error:
            _note(steps, "credential", False, error.detail)
            return Decision(error.reason, policy.name, policy, error.detail)
        _note(steps, "credential", True, "bearer token found in the Authorization header")

        try:
            verified = self._verify(token, policy, may_wait)
        except VerificationError as error:
            _note(steps, "verification", False, error.detail)
            return Decision(error.reason, policy.name, policy, error.detail)
        if steps is not None:
            _note(steps, "verification", True, f"vouched for by issuer {verified.issuer.name!r}")

        issuer_name = verified.issuer.name
        try:
            identity = apply_policy(
                policy, self.config, verified.issuer, verified.claims, self._clock()
            )
        except ClaimError as error:
            _note(steps, "policy checks", False, error.detail)
            return Decision(
                error.reason,
                policy.name,
                policy,
                error.detail,
                issuer_name=issuer_name,
                client_id=_client_id_for_log(verified),
            )
        _note(steps, "policy checks", True, "time, audience, application and scopes accepted")
        return Decision(
            Reason.OK,
            policy.name,
            policy,
            identity=identity,
            issuer_name=issuer_name,
            client_id=identity.client_id,
            rendered=verified.rendered,
        )

    def _verify(self, token: str, policy: PolicyConfig, may_wait: bool) -> VerifiedToken:
        # A token that is not a three-part JWS is opaque: it goes to the
        # introspection endpoint of the policy's issuer, when one has it.
        if token.count(".") != 2:
            for issuer_name in policy.issuers:
                introspector = self.introspectors.get(issuer_name)
                if introspector is not None:
                    return introspector.introspect(token, may_wait)
        return self._verifier.verify(token, policy.issuers, may_wait)


class AuthorizationService(external_auth_pb2_grpc.AuthorizationServicer):
    """Envoy's Authorization service. Every input gets a CheckResponse, never a gRPC error."""

    def __init__(
        self,
        config: Config,
        issuer_keys: Mapping[str, IssuerKeys],
        metrics: Metrics,
        tracer: CheckTracer | None = None,
    ) -> None:
        self._metrics = metrics
        self._decision_counters: dict[tuple[str, str, str], Any] = {}
        self._tracer = tracer or CheckTracer()
        self.engine = DecisionEngine(config, issuer_keys, metrics)

    def replace_config(self, config: Config, issuer_keys: Mapping[str, IssuerKeys]) -> None:
        """Switch to a new configuration; calls in flight finish with the old one."""
        # One attribute assignment, so each call uses either engine, never a mix.
        self.engine = DecisionEngine(config, issuer_keys, self._metrics, previous=self.engine)

    def Check(self, request: CheckRequest, context: grpc.ServicerContext) -> CheckResponse:
        """Decide one Check call on the calling thread, waiting on the network when needed.

        The sidecar serves gRPC from grpc_authz.py on an event loop; this
        synchronous form is for callers in the same process, such as tests.
        """
        started = time.perf_counter()
        response = self.respond(request)
        self._metrics.check_duration.observe(time.perf_counter() - started)
        return response

    def respond(
        self, request: CheckRequest, may_wait: bool = True, started_ns: int | None = None
    ) -> CheckResponse:
        """Decide one CheckRequest and build its CheckResponse; any error becomes a deny.

        WaitNeeded passes through, as from evaluate().
        """
        try:
            return _grpc_response(self.evaluate(view_request(request), may_wait, started_ns))
        except WaitNeeded:
            raise
        except Exception:
            return self.internal_error_response()

    def internal_error_response(self) -> CheckResponse:
        """Count and log an unexpected error, and return its deny response."""
        deny = self.engine.config.deny
        return build_response(self.internal_error(None, deny).decision, deny)

    def trace_start(self) -> int | None:
        """Return the start time for the trace span of a call, or None when tracing is off."""
        return time.time_ns() if self._tracer.enabled else None

    def evaluate(
        self, view: RequestView, may_wait: bool = True, started_ns: int | None = None
    ) -> Outcome:
        """Decide on one request, count it, log a deny and trace it; used by both front ends.

        A front end on an event loop passes `may_wait=False`. On WaitNeeded
        nothing has been counted, logged or traced yet, and it calls again
        on a thread with `may_wait=True` and the first call's `started_ns`
        (time.time_ns()), so the trace span covers both.
        """
        tracer = self._tracer
        if started_ns is None and tracer.enabled:
            started_ns = time.time_ns()
        outcome = self._evaluate(view, may_wait)
        # The span is opened after the decision, with the decision's start
        # time, so a call that moves to a thread still makes exactly one span.
        with tracer.check_span(view.headers, started_ns) as span:
            span.record(outcome.label, outcome.decision.reason.label, outcome.decision.policy_name)
        return outcome

    def _evaluate(self, view: RequestView, may_wait: bool) -> Outcome:
        engine = self.engine
        deny = engine.config.deny
        try:
            decision = engine.decide(view, may_wait=may_wait)
        except WaitNeeded:
            raise
        except Exception:
            return self.internal_error(view, deny)
        if decision.allowed:
            label = "allow"
        elif decision.policy is not None and decision.policy.dry_run:
            # Dry run: let the request through without identity headers and
            # count what enforcement would have denied.
            label = "dry_run_deny"
        else:
            label = "deny"
        self._record(decision, view, label, deny)
        return Outcome(decision, label, deny)

    def internal_error(self, view: RequestView | None, deny: DenyConfig) -> Outcome:
        log.exception("Check failed with an unexpected error; denying the request")
        decision = Decision(Reason.INTERNAL_ERROR, UNKNOWN_POLICY, detail="unexpected error")
        self._record(decision, view, "deny", deny)
        return Outcome(decision, "deny", deny)

    def observe_duration(self, seconds: float) -> None:
        self._metrics.check_duration.observe(seconds)

    def _record(
        self, decision: Decision, view: RequestView | None, outcome: str, deny: DenyConfig
    ) -> None:
        labels = (decision.policy_name, outcome, decision.reason.label)
        counter = self._decision_counters.get(labels)
        if counter is None:
            counter = self._decision_counters[labels] = self._metrics.decisions.labels(*labels)
        counter.inc()
        if outcome == "allow":
            return
        prefix = "dry run, would deny" if outcome == "dry_run_deny" else "denied"
        log.info(
            "%s request: policy=%s reason=%s status=%d issuer=%s client_id=%s request_id=%s "
            "detail=%s",
            prefix,
            decision.policy_name,
            decision.reason.label,
            http_status(decision.reason, deny),
            decision.issuer_name or "-",
            decision.client_id or "-",
            view.request_id if view else "-",
            decision.detail,
            extra={
                "decision": outcome,
                "policy": decision.policy_name,
                "reason": decision.reason.label,
                "issuer": decision.issuer_name,
                "client_id": decision.client_id,
                "request_id": view.request_id if view else None,
                "detail": decision.detail,
            },
        )


@dataclass(slots=True)
class Outcome:
    """A decision with its metric label (allow, deny or dry_run_deny) and the deny settings."""

    decision: Decision
    label: str
    deny: DenyConfig


def _grpc_response(outcome: Outcome) -> CheckResponse:
    decision = outcome.decision
    if outcome.label == "allow":
        return rendered_allow(decision, "grpc", _grpc_allow)
    if outcome.label == "dry_run_deny":
        assert decision.policy is not None
        return allow_response(decision.policy, None)
    return build_response(decision, outcome.deny)


def _grpc_allow(decision: Decision) -> CheckResponse:
    assert decision.policy is not None
    return allow_response(decision.policy, decision.identity)


def _client_id_for_log(verified: VerifiedToken) -> str | None:
    try:
        return client_id(verified.claims, verified.issuer.client_id_claims)
    except ClaimError:
        return None


def _note(steps: list[Step] | None, name: str, passed: bool, detail: str) -> None:
    if steps is not None:
        steps.append(Step(name, passed, detail))
