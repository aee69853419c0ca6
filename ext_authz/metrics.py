"""Prometheus metrics. Labels are bounded sets: policy, decision, reason, issuer name."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

# The *_created series double the exposition size and no alert uses them.
disable_created_metrics()


class Metrics:
    """The service's metrics, kept in their own registry so tests can make fresh ones."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.decisions = Counter(
            "ext_authz_decisions",
            "Check decisions by policy, decision (allow, deny or dry_run_deny) and reason.",
            ["policy", "decision", "reason"],
            registry=self.registry,
        )
        self.check_duration = Histogram(
            "ext_authz_check_duration_seconds",
            "Time spent answering one Check call, in seconds.",
            # Up to Envoy's 0.5 s Check timeout and beyond, so a p99 near it is visible.
            buckets=(
                0.0001,
                0.00025,
                0.0005,
                0.001,
                0.0025,
                0.005,
                0.01,
                0.025,
                0.05,
                0.1,
                0.25,
                0.5,
                1.0,
                2.5,
            ),
            registry=self.registry,
        )
        self.jwks_fetches = Counter(
            "ext_authz_jwks_fetches",
            "Key fetches (metadata and JWKS) by issuer and result: ok, timeout, http_error, "
            "invalid, or rate_limited for a refetch skipped by jwks_min_refetch_seconds.",
            ["issuer", "result"],
            registry=self.registry,
        )
        self.jwks_keys = Gauge(
            "ext_authz_jwks_keys",
            "Usable signing keys currently cached per issuer.",
            ["issuer"],
            registry=self.registry,
        )
        self.unknown_kid_refetches = Counter(
            "ext_authz_jwks_unknown_kid_refetches",
            "Key-set refetches started because a token named a kid the cache lacked.",
            ["issuer"],
            registry=self.registry,
        )
        self.introspection_requests = Counter(
            "ext_authz_introspection_requests",
            "Token introspection requests by issuer and result: ok, timeout, http_error, "
            "invalid, or rate_limited while the endpoint is unknown.",
            ["issuer", "result"],
            registry=self.registry,
        )
        self.introspection_cache = Counter(
            "ext_authz_introspection_cache",
            "Introspection cache lookups by issuer and result (hit or miss).",
            ["issuer", "result"],
            registry=self.registry,
        )
        self.config_reloads = Counter(
            "ext_authz_config_reloads",
            "Configuration reloads by result: ok, or invalid when the new file was rejected.",
            ["result"],
            registry=self.registry,
        )
        self.jwks_age = Gauge(
            "ext_authz_jwks_age_seconds",
            "Seconds since the issuer's key set was last fetched successfully; -1 before that.",
            ["issuer"],
            registry=self.registry,
        )
