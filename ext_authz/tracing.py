"""Optional OpenTelemetry tracing of Check calls.

OpenTelemetry is imported only by `build_tracer` and only when tracing is
enabled, so the sidecar runs without the `tracing` extra installed. When
tracing is disabled, or OpenTelemetry or its OTLP exporter is missing,
`build_tracer` returns a `CheckTracer` whose `check_span` returns one shared
no-op object, which costs a method call per Check.

A span continues the caller's trace from the W3C Trace Context headers
`traceparent` and `tracestate` (https://www.w3.org/TR/trace-context/). Those
are the only request headers it reads, and its attributes are fixed strings
and the bounded decision, reason and policy labels, never a token or another
header value.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from . import __version__

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

log = logging.getLogger(__name__)

SPAN_NAME = "ext_authz.Check"
TRACE_CONTEXT_HEADERS = ("traceparent", "tracestate")
INSTALL_HINT = "pip install 'ext-authz[tracing]'"
# The reason label of an unexpected error inside the service (Reason.INTERNAL_ERROR).
INTERNAL_ERROR_REASON = "internal_error"
# OpenTelemetry semantic conventions for RPC server spans.
RPC_ATTRIBUTES = {
    "rpc.system": "grpc",
    "rpc.service": "envoy.service.auth.v3.Authorization",
    "rpc.method": "Check",
}


@dataclass(frozen=True)
class TracingConfig:
    """Tracing settings.

    `otlp_endpoint` is the full OTLP/HTTP traces URL, for example
    `http://otel-collector:4318/v1/traces`. When it is None, the exporter
    reads `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT`,
    and otherwise sends to `http://localhost:4318/v1/traces`. `sample_ratio`
    is the share of new traces that are recorded (0 to 1). A Check call that
    continues a trace follows the caller's sampled flag instead.
    """

    enabled: bool = False
    service_name: str = "ext-authz"
    otlp_endpoint: str | None = None
    sample_ratio: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.sample_ratio <= 1.0:
            raise ValueError(f"sample_ratio must be between 0 and 1, got {self.sample_ratio!r}")
        if not self.service_name:
            raise ValueError("service_name must not be empty")


class CheckSpan(Protocol):
    """Span of one Check call, as the Check path uses it."""

    def record(self, decision_label: str, reason_label: str, policy: str) -> None: ...


class CheckTracer:
    """Tracer of Check calls. This base class is the disabled tracer, which records nothing."""

    enabled = False

    def check_span(
        self, headers: Mapping[str, str], start_ns: int | None = None
    ) -> AbstractContextManager[CheckSpan]:
        """Return a context manager around one Check call. `headers` has lower-case names.

        `start_ns` (from time.time_ns()) back-dates the span's start, for a
        span that is opened once the decision is made.
        """
        return _NOOP_SPAN

    def shutdown(self) -> None:
        """Export the spans still buffered and stop the exporter. Call it once, at shut-down."""


class _NoopSpan:
    """A context manager and CheckSpan in one object, so the disabled path allocates nothing."""

    __slots__ = ()

    def __enter__(self) -> _NoopSpan:
        return self

    def __exit__(self, *exception: object) -> None:
        return None

    def record(self, decision_label: str, reason_label: str, policy: str) -> None:
        return None


_NOOP_SPAN = _NoopSpan()


class _RecordingSpan:
    def __init__(self, span: Any, status_error: Any) -> None:
        self._span = span
        self._status_error = status_error

    def record(self, decision_label: str, reason_label: str, policy: str) -> None:
        self._span.set_attributes(
            {
                "ext_authz.decision": decision_label,
                "ext_authz.reason": reason_label,
                "ext_authz.policy": policy,
            }
        )
        # A deny is a correct result, so only an internal error marks the span as failed.
        if reason_label == INTERNAL_ERROR_REASON:
            self._span.set_status(self._status_error(reason_label))


class _OpenTelemetryCheckTracer(CheckTracer):
    enabled = True

    def __init__(self, provider: TracerProvider) -> None:
        from opentelemetry.trace import SpanKind, Status, StatusCode
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._provider = provider
        self._tracer = provider.get_tracer("ext_authz", __version__)
        self._propagator = TraceContextTextMapPropagator()
        self._server_kind = SpanKind.SERVER
        self._status_error = functools.partial(Status, StatusCode.ERROR)

    @contextmanager
    def check_span(
        self, headers: Mapping[str, str], start_ns: int | None = None
    ) -> Iterator[CheckSpan]:
        carrier = {name: headers[name] for name in TRACE_CONTEXT_HEADERS if name in headers}
        parent = self._propagator.extract(carrier)
        # record_exception=False: an exception message could quote request data.
        with self._tracer.start_as_current_span(
            SPAN_NAME,
            context=parent,
            kind=self._server_kind,
            attributes=RPC_ATTRIBUTES,
            start_time=start_ns,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                yield _RecordingSpan(span, self._status_error)
            except Exception as error:
                span.set_status(self._status_error(type(error).__name__))
                raise

    def shutdown(self) -> None:
        self._provider.shutdown()


def build_tracer(config: TracingConfig, exporter: SpanExporter | None = None) -> CheckTracer:
    """Build the tracer for Check calls from `config`.

    `exporter` replaces the OTLP exporter, for tests and debugging; it gets
    each span synchronously when the span ends. Without it, spans go to the
    OTLP/HTTP exporter in batches. A missing OpenTelemetry package or OTLP
    exporter is logged as a warning, and the service runs without tracing.
    """
    if not config.enabled:
        return CheckTracer()

    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    except ImportError as error:
        log.warning(
            "tracing is enabled but OpenTelemetry is not installed (%s); Check calls are "
            "not traced. Install it with: %s",
            error,
            INSTALL_HINT,
        )
        return CheckTracer()

    if exporter is not None:
        processor = SimpleSpanProcessor(exporter)
        destination = type(exporter).__name__
    else:
        otlp = _otlp_exporter(config)
        if otlp is None:
            return CheckTracer()
        processor = BatchSpanProcessor(otlp)
        destination = config.otlp_endpoint or "the OTLP endpoint from the environment"

    provider = TracerProvider(
        resource=Resource.create({"service.name": config.service_name}),
        sampler=ParentBased(root=TraceIdRatioBased(config.sample_ratio)),
    )
    provider.add_span_processor(processor)
    log.info(
        "tracing Check calls as service %s with sample ratio %g, exporting to %s",
        config.service_name,
        config.sample_ratio,
        destination,
    )
    return _OpenTelemetryCheckTracer(provider)


def _otlp_exporter(config: TracingConfig) -> SpanExporter | None:
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as error:
        log.warning(
            "tracing is enabled but the OTLP/HTTP exporter is not installed (%s); spans to "
            "%s are not exported and Check calls are not traced. Install it with: %s",
            error,
            config.otlp_endpoint or "the default endpoint",
            INSTALL_HINT,
        )
        return None
    return OTLPSpanExporter(endpoint=config.otlp_endpoint)
