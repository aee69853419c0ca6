"""Tracing of Check calls (ext_authz/tracing.py), with OpenTelemetry's in-memory exporter."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from ext_authz.api.envoy.service.auth.v3.external_auth_pb2 import CheckRequest
from ext_authz.config import parse_config
from ext_authz.issuer_keys import IssuerKeys
from ext_authz.metrics import Metrics
from ext_authz.request_view import RequestView
from ext_authz.service import AuthorizationService
from ext_authz.tracing import SPAN_NAME, CheckTracer, TracingConfig, build_tracer
from ext_authz.verify import WaitNeeded

from .support import IssuerServer, SigningKey, claims_for

REPOSITORY = Path(__file__).resolve().parents[1]
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN_ID = "00f067aa0ba902b7"
SAMPLED_PARENT = f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"
UNSAMPLED_PARENT = f"00-{TRACE_ID}-{PARENT_SPAN_ID}-00"
# Token-like values that must never reach a span.
TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ1c2VyLTEifQ.c2lnbmF0dXJlLXNlY3JldA"
COOKIE_VALUE = "session=cookie-secret-value"


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracer(exporter: InMemorySpanExporter) -> Iterator[CheckTracer]:
    built = build_tracer(TracingConfig(enabled=True, service_name="ext-authz-test"), exporter)
    yield built
    built.shutdown()


def only_span(exporter: InMemorySpanExporter) -> Any:
    spans = exporter.get_finished_spans()
    assert len(spans) == 1, [span.name for span in spans]
    return spans[0]


def all_attribute_values(span: Any) -> list[str]:
    values = [str(value) for value in span.attributes.values()]
    values += [str(value) for value in span.resource.attributes.values()]
    for event in span.events:
        values += [event.name, *(str(value) for value in event.attributes.values())]
    values.append(span.name)
    if span.status.description:
        values.append(span.status.description)
    return values


def test_span_continues_traceparent(tracer: CheckTracer, exporter: InMemorySpanExporter):
    headers = {"traceparent": SAMPLED_PARENT, "tracestate": "vendor=opaque"}

    with tracer.check_span(headers) as span:
        span.record("allow", "ok", "default")

    finished = only_span(exporter)
    assert finished.name == SPAN_NAME
    assert finished.kind == SpanKind.SERVER
    assert finished.context.trace_id == int(TRACE_ID, 16)
    assert finished.parent is not None
    assert finished.parent.span_id == int(PARENT_SPAN_ID, 16)
    assert finished.parent.is_remote
    assert finished.context.trace_state.get("vendor") == "opaque"


def test_span_records_decision(tracer: CheckTracer, exporter: InMemorySpanExporter):
    with tracer.check_span({"traceparent": SAMPLED_PARENT}) as span:
        span.record("deny", "audience_mismatch", "orders-api")

    attributes = only_span(exporter).attributes
    assert attributes["ext_authz.decision"] == "deny"
    assert attributes["ext_authz.reason"] == "audience_mismatch"
    assert attributes["ext_authz.policy"] == "orders-api"
    assert attributes["rpc.system"] == "grpc"
    assert attributes["rpc.service"] == "envoy.service.auth.v3.Authorization"
    assert attributes["rpc.method"] == "Check"


def test_span_resource_names_service(tracer: CheckTracer, exporter: InMemorySpanExporter):
    with tracer.check_span({}) as span:
        span.record("allow", "ok", "default")

    assert only_span(exporter).resource.attributes["service.name"] == "ext-authz-test"


def test_span_holds_no_header_values(tracer: CheckTracer, exporter: InMemorySpanExporter):
    headers = {
        "traceparent": SAMPLED_PARENT,
        "authorization": f"Bearer {TOKEN}",
        "cookie": COOKIE_VALUE,
        "x-api-key": "api-key-secret",
        "baggage": "user=alice",
    }

    with tracer.check_span(headers) as span:
        span.record("deny", "signature_invalid", "default")

    values = all_attribute_values(only_span(exporter))
    for secret in (TOKEN, *TOKEN.split("."), "cookie-secret-value", "api-key-secret", "alice"):
        assert not any(secret in value for value in values), secret


def test_span_without_parent_starts_trace(tracer: CheckTracer, exporter: InMemorySpanExporter):
    with tracer.check_span({"authorization": f"Bearer {TOKEN}"}) as span:
        span.record("allow", "ok", "default")

    finished = only_span(exporter)
    assert finished.parent is None
    assert finished.context.trace_id != int(TRACE_ID, 16)


def test_malformed_traceparent_starts_trace(tracer: CheckTracer, exporter: InMemorySpanExporter):
    with tracer.check_span({"traceparent": "00-not-a-trace-id-01"}) as span:
        span.record("allow", "ok", "default")

    assert only_span(exporter).parent is None


def test_internal_error_marks_span_failed(tracer: CheckTracer, exporter: InMemorySpanExporter):
    with tracer.check_span({}) as span:
        span.record("deny", "internal_error", "_unknown")

    status = only_span(exporter).status
    assert status.status_code == StatusCode.ERROR
    assert status.description == "internal_error"


def test_deny_leaves_span_status_unset(tracer: CheckTracer, exporter: InMemorySpanExporter):
    with tracer.check_span({}) as span:
        span.record("deny", "token_expired", "default")

    assert only_span(exporter).status.status_code == StatusCode.UNSET


def test_exception_recorded_without_message(tracer: CheckTracer, exporter: InMemorySpanExporter):
    with pytest.raises(ValueError), tracer.check_span({}):
        raise ValueError(f"bad token {TOKEN}")

    finished = only_span(exporter)
    assert finished.status.status_code == StatusCode.ERROR
    assert finished.status.description == "ValueError"
    assert not any(TOKEN in value for value in all_attribute_values(finished))


def test_sample_ratio_zero_drops_new_traces(exporter: InMemorySpanExporter):
    tracer = build_tracer(TracingConfig(enabled=True, sample_ratio=0.0), exporter)

    with tracer.check_span({}) as span:
        span.record("allow", "ok", "default")
    with tracer.check_span({"traceparent": UNSAMPLED_PARENT}) as span:
        span.record("allow", "ok", "default")
    assert exporter.get_finished_spans() == ()

    # A caller that sampled its trace gets the span whatever the ratio.
    with tracer.check_span({"traceparent": SAMPLED_PARENT}) as span:
        span.record("allow", "ok", "default")
    assert only_span(exporter).context.trace_id == int(TRACE_ID, 16)
    tracer.shutdown()


def test_config_rejects_bad_ratio():
    with pytest.raises(ValueError, match="sample_ratio"):
        TracingConfig(enabled=True, sample_ratio=1.5)


def test_disabled_tracer_is_noop(exporter: InMemorySpanExporter):
    tracer = build_tracer(TracingConfig(enabled=False), exporter)

    first = tracer.check_span({"traceparent": SAMPLED_PARENT})
    with first as span:
        span.record("allow", "ok", "default")

    assert tracer.enabled is False
    assert tracer.check_span({}) is first
    assert exporter.get_finished_spans() == ()


def test_disabled_tracer_costs_little():
    tracer = build_tracer(TracingConfig())
    headers = {"traceparent": SAMPLED_PARENT}
    calls = 100_000

    started = time.perf_counter()
    for _ in range(calls):
        with tracer.check_span(headers) as span:
            span.record("allow", "ok", "default")
    elapsed = time.perf_counter() - started

    # Under a microsecond per call on a 2-core test machine. The bound leaves
    # a wide margin, and it still fails if the no-op path starts real spans.
    assert elapsed / calls < 10e-6


@pytest.fixture
def without_opentelemetry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every `import opentelemetry...` raise ImportError, as when it is not installed."""
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    for name in list(sys.modules):
        if name.startswith("opentelemetry."):
            monkeypatch.setitem(sys.modules, name, None)


@pytest.mark.usefixtures("without_opentelemetry")
def test_missing_opentelemetry_disables_tracing(caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.WARNING, logger="ext_authz.tracing"):
        tracer = build_tracer(TracingConfig(enabled=True, otlp_endpoint="http://127.0.0.1:4318"))

    assert tracer.enabled is False
    with tracer.check_span({"traceparent": SAMPLED_PARENT}) as span:
        span.record("allow", "ok", "default")
    assert "OpenTelemetry is not installed" in caplog.text
    assert "pip install 'ext-authz[tracing]'" in caplog.text


def test_missing_exporter_disables_tracing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    for name in list(sys.modules):
        if name.startswith("opentelemetry.exporter"):
            monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter", None)

    with caplog.at_level(logging.WARNING, logger="ext_authz.tracing"):
        tracer = build_tracer(
            TracingConfig(enabled=True, otlp_endpoint="http://127.0.0.1:4318/v1/traces")
        )

    assert tracer.enabled is False
    assert "OTLP/HTTP exporter is not installed" in caplog.text
    assert "http://127.0.0.1:4318/v1/traces" in caplog.text


@pytest.mark.parametrize("exporter_first", [True, False])
def test_otlp_exporter_loads_beside_api(exporter_first: bool):
    # protobuf rejects a second definition of google.rpc.Status, which both
    # ext_authz/api and googleapis-common-protos (an exporter dependency)
    # provide, so the exporter must not import google.rpc.status_pb2.
    imports = [
        "from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter",
        "from ext_authz.api.envoy.service.auth.v3 import external_auth_pb2",
    ]
    if not exporter_first:
        imports.reverse()
    script = "\n".join(
        [
            "import sys",
            *imports,
            "from ext_authz.tracing import TracingConfig, build_tracer",
            "tracer = build_tracer(TracingConfig(enabled=True, "
            "otlp_endpoint='http://127.0.0.1:9/v1/traces'))",
            "assert tracer.enabled",
            "assert 'google.rpc.status_pb2' not in sys.modules",
            "response = external_auth_pb2.CheckResponse()",
            "response.status.code = 16",
            "assert response.status.DESCRIPTOR.full_name == 'google.rpc.Status'",
            "tracer.shutdown()",
        ]
    )

    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPOSITORY,
    )

    assert result.returncode == 0, result.stderr


def traced_service(
    issuer_url: str,
) -> tuple[AuthorizationService, CheckTracer, InMemorySpanExporter]:
    """Return a servicer with tracing on, its tracer and the exporter that keeps its spans."""
    config = parse_config(
        {
            "tracing": {"enabled": True},
            "issuers": [
                {
                    "name": "local",
                    "issuer": issuer_url,
                    "audiences": ["Amplify Central"],
                    "allow_insecure_http": True,
                    "jwks_min_refetch_seconds": 0,
                }
            ],
            "policies": [{"name": "default", "issuers": ["local"]}],
        }
    )
    metrics = Metrics()
    keys = {"local": IssuerKeys(config.issuers[0], metrics)}
    keys["local"].refresh()
    exporter = InMemorySpanExporter()
    tracer = build_tracer(config.tracing, exporter=exporter)
    return AuthorizationService(config, keys, metrics, tracer), tracer, exporter


def test_check_calls_traced_through_servicer(issuer_server: IssuerServer, rsa_key: SigningKey):
    """The servicer wraps each decision in a span, with the decision labels only."""
    service, tracer, exporter = traced_service(issuer_server.url)
    token = rsa_key.sign(claims_for(issuer_server.url))
    request = CheckRequest()
    request.attributes.request.http.headers["authorization"] = f"Bearer {token}"
    request.attributes.request.http.headers["traceparent"] = (
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    )

    assert service.Check(request, None).status.code == 0  # type: ignore[arg-type]

    spans = exporter.get_finished_spans()
    assert len(spans) == 1
    assert spans[0].attributes["ext_authz.decision"] == "allow"
    assert format(spans[0].context.trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"
    assert all(token not in str(value) for value in spans[0].attributes.values())
    tracer.shutdown()


def test_call_moved_to_wait_pool_makes_one_span(issuer_server: IssuerServer):
    """A decision that needs a key refetch is tried on the loop, then on a thread: one span."""
    service, tracer, exporter = traced_service(issuer_server.url)
    rotated = SigningKey.rsa("rotated")
    issuer_server.keys.append(rotated)
    view = RequestView(
        headers={"authorization": f"Bearer {rotated.sign(claims_for(issuer_server.url))}"},
        method="GET",
        host="api.example",
        path="/",
        context_extensions={},
    )
    started_ns = time.time_ns()

    with pytest.raises(WaitNeeded):
        service.evaluate(view, False, started_ns)
    assert exporter.get_finished_spans() == ()
    outcome = service.evaluate(view, True, started_ns)

    spans = exporter.get_finished_spans()
    assert outcome.label == "allow"
    assert len(spans) == 1
    assert spans[0].start_time == started_ns
    assert spans[0].attributes["ext_authz.decision"] == "allow"
    tracer.shutdown()
