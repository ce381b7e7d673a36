"""One trace per task: W3C trace context rides in NATS headers across every hop.

`init_tracing()` is called once per process. Spans are always created (so the
context propagates through a service even when it exports nothing); they are
exported over OTLP/HTTP only when an endpoint is configured.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from opentelemetry import context, propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, SpanKind

_provider: TracerProvider | None = None


def init_tracing(service_name: str, otlp_endpoint: str = "") -> None:
    """Install the process's tracer provider; export to `otlp_endpoint` if given."""
    global _provider
    if _provider is not None:
        return
    _provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=otlp_endpoint.rstrip("/") + "/v1/traces")
        _provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=500))
    trace.set_tracer_provider(_provider)


def shutdown_tracing() -> None:
    """Flush what is buffered; call once at process exit."""
    global _provider
    if _provider is not None:
        _provider.shutdown()
        _provider = None


def tracer() -> trace.Tracer:
    return trace.get_tracer("corral")


def inject(headers: dict[str, str]) -> dict[str, str]:
    """Write the current trace context (traceparent, tracestate) into `headers`."""
    propagate.inject(headers)
    return headers


@contextmanager
def consuming(name: str, headers: Mapping[str, str] | None, attributes: dict[str, str]) -> Iterator[Span]:
    """A CONSUMER span continuing the trace found in `headers`, current while the block runs."""
    parent = propagate.extract(dict(headers or {}))
    token = context.attach(parent)
    try:
        with tracer().start_as_current_span(name, kind=SpanKind.CONSUMER, attributes=attributes) as span:
            yield span
    finally:
        context.detach(token)


@contextmanager
def producing(name: str, attributes: dict[str, str]) -> Iterator[Span]:
    """A PRODUCER span for a message that starts a trace (e.g. a task submission)."""
    with tracer().start_as_current_span(name, kind=SpanKind.PRODUCER, attributes=attributes) as span:
        yield span
