"""A tiny OTLP/HTTP receiver for tests, of traces (/v1/traces) and metrics (/v1/metrics): decodes the protobuf
the real exporters send."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)


class ReceivedSpan(tuple):
    """(trace_id hex, service.name, span name)"""


class OtlpReceiver:
    def __init__(self) -> None:
        self.spans: list[tuple[str, str, str]] = []
        self.detailed: list[tuple[str, str, str, dict]] = []
        """Each span with its attributes (strings, ints, floats, bools, lists of them)."""
        self.raw: list[bytes] = []
        """Every trace request's body as the exporter sent it."""
        self.points: list[tuple[str, str, dict, object]] = []
        """Every metric data point: (service.name, metric name, attributes, the point)."""
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path.endswith("/v1/metrics"):
                    receiver._collect_metrics(ExportMetricsServiceRequest.FromString(body))
                    reply = ExportMetricsServiceResponse().SerializeToString()
                else:
                    with receiver._lock:
                        receiver.raw.append(body)
                    receiver._collect(ExportTraceServiceRequest.FromString(body))
                    reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _collect(self, request: ExportTraceServiceRequest) -> None:
        for resource_spans in request.resource_spans:
            attrs = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            service = attrs.get("service.name", "?")
            for scope in resource_spans.scope_spans:
                with self._lock:
                    self.spans.extend((span.trace_id.hex(), service, span.name) for span in scope.spans)
                    self.detailed.extend((span.trace_id.hex(), service, span.name, _attributes(span.attributes))
                                         for span in scope.spans)

    def _collect_metrics(self, request: ExportMetricsServiceRequest) -> None:
        for resource_metrics in request.resource_metrics:
            attrs = {a.key: a.value.string_value for a in resource_metrics.resource.attributes}
            service = attrs.get("service.name", "?")
            for scope in resource_metrics.scope_metrics:
                for metric in scope.metrics:
                    kind = metric.WhichOneof("data")
                    points = getattr(metric, kind).data_points if kind else []
                    with self._lock:
                        self.points.extend((service, metric.name, _attributes(p.attributes), p) for p in points)

    def metric(self, name: str) -> list[tuple[dict, object]]:
        """The data points received of metric `name`: (attributes, point)."""
        with self._lock:
            return [(attributes, point) for _, metric, attributes, point in self.points if metric == name]

    def named(self, prefix: str) -> list[tuple[str, str, str, dict]]:
        """Spans whose name starts with `prefix`, with their attributes."""
        with self._lock:
            return [span for span in self.detailed if span[2].startswith(prefix)]

    def services_in_trace(self, trace_id: str) -> set[str]:
        with self._lock:
            return {service for tid, service, _ in self.spans if tid == trace_id}

    def __enter__(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def _value(value):
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


def _attributes(attributes) -> dict:
    return {a.key: _value(a.value) for a in attributes}
