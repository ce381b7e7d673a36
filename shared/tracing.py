"""One trace per task: W3C trace context rides in NATS headers across every hop.

`init_tracing()` is called once per process. With an OTLP endpoint, every hop is
a span exported over OTLP/HTTP. Without one, no span is made (measured: spans
cost about a quarter of the pipeline's CPU), but the incoming `traceparent` is
still carried to everything the handler publishes, so a task keeps one trace id
through processes that export nothing.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar

from opentelemetry import context, propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

_provider: TracerProvider | None = None
_tracer: trace.Tracer | None = None  # set only while spans are exported
TRACE_HEADERS = ("traceparent", "tracestate")
_carried: ContextVar[dict[str, str]] = ContextVar("corral_trace_headers", default={})


def init_tracing(service_name: str, otlp_endpoint: str = "") -> None:
    """Install the process's tracer provider; export to `otlp_endpoint` if given."""
    global _provider, _tracer
    if _provider is not None or not otlp_endpoint:
        return
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    _provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    exporter = OTLPSpanExporter(endpoint=otlp_endpoint.rstrip("/") + "/v1/traces")
    _provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=500))
    trace.set_tracer_provider(_provider)
    _tracer = trace.get_tracer("corral")


def shutdown_tracing() -> None:
    """Flush what is buffered; call once at process exit."""
    global _provider, _tracer
    if _provider is not None:
        _provider.shutdown()
        _provider, _tracer = None, None


def inject(headers: dict[str, str]) -> dict[str, str]:
    """Write the current trace context (traceparent, tracestate) into `headers`."""
    if _tracer is not None:
        propagate.inject(headers)
    else:
        headers.update(_carried.get())
    return headers


def consuming(name: str, headers: Mapping[str, str] | None,
              attributes: dict[str, str]) -> AbstractContextManager[Span | None]:
    """A CONSUMER span continuing the trace found in `headers`, current while the block runs."""
    if _tracer is None:  # on every message: a plain object, not a generator (a third of the cost)
        return _Carrying({k: headers[k] for k in TRACE_HEADERS if k in headers} if headers else {})
    return _consumer_span(name, headers, attributes)


@contextmanager
def _consumer_span(name: str, headers: Mapping[str, str] | None, attributes: dict[str, str]) -> Iterator[Span]:
    token = context.attach(propagate.extract(dict(headers or {})))
    try:
        with _tracer.start_as_current_span(name, kind=SpanKind.CONSUMER, attributes=attributes) as span:
            yield span
    finally:
        context.detach(token)


@contextmanager
def within(headers: Mapping[str, str]) -> Iterator[None]:
    """Make the trace in `headers` current (no span of its own), e.g. for work a bucket watch started: what the
    block's spans and publishes make joins it."""
    carried = {k: headers[k] for k in TRACE_HEADERS if k in headers}
    if _tracer is None:
        with _Carrying(carried):
            yield
        return
    token = context.attach(propagate.extract(carried))
    try:
        yield
    finally:
        context.detach(token)


@contextmanager
def producing(name: str, attributes: dict[str, str]) -> Iterator[Span | None]:
    """A PRODUCER span for a message that starts a trace (e.g. a task submission)."""
    if _tracer is None:  # no export here, but later hops may export: start the trace id anyway
        with _Carrying({"traceparent": f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"}):
            yield None
        return
    with _tracer.start_as_current_span(name, kind=SpanKind.PRODUCER, attributes=attributes) as span:
        yield span


@contextmanager
def span(name: str, attributes: dict[str, object] | None = None,
         kind: SpanKind = SpanKind.INTERNAL) -> Iterator[Span | None]:
    """A span inside the current trace (a model or tool call in a handler); None when nothing is exported."""
    if _tracer is None:
        yield None
        return
    with _tracer.start_as_current_span(name, kind=kind, attributes=attributes or {},
                                       record_exception=False, set_status_on_exception=False) as current:
        yield current


def error_status(description: str) -> Status:
    return Status(StatusCode.ERROR, description)


class _Carrying:
    """Carry `headers` (the trace context) to what the block publishes."""

    __slots__ = ("headers", "token")

    def __init__(self, headers: dict[str, str]) -> None:
        self.headers = headers

    def __enter__(self) -> None:
        self.token = _carried.set(self.headers)

    def __exit__(self, *_: object) -> None:
        _carried.reset(self.token)

