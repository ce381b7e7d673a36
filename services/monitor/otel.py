"""The monitor's figures as OpenTelemetry metrics, exported over OTLP/HTTP (when Settings.otlp_endpoint is set).

GenAI semantic-convention instruments where they exist, recorded from each live step (not from a replay,
which an earlier process exported already): `gen_ai.client.token.usage` (histogram, `gen_ai.token.type`
input or output) and `gen_ai.client.operation.duration` (histogram, seconds), with `gen_ai.operation.name`,
`gen_ai.provider.name`, `gen_ai.request.model` and, for a failure, `error.type`. The rest are `corral.*`
gauges observed from the monitor's windows at each export.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

from contracts import StepCompleted, StepFailed
from contracts.events import Alert
from services.monitor.handlers import Metrics

# The GenAI conventions' advised bucket boundaries.
TOKEN_BUCKETS = [1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864]
DURATION_BUCKETS = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92]
WINDOW = "5m"  # the window the corral.* gauges report


class OtelMetrics:
    def __init__(self, metrics: Metrics, endpoint: str, interval_s: float,
                 firing: Callable[[], Iterable[Alert]]) -> None:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        self.metrics, self.firing = metrics, firing
        exporter = OTLPMetricExporter(endpoint=endpoint.rstrip("/") + "/v1/metrics")
        reader = PeriodicExportingMetricReader(exporter, export_interval_millis=interval_s * 1000)
        self.provider = MeterProvider(resource=Resource.create({"service.name": "corral-monitor"}),
                                      metric_readers=[reader])
        meter = self.provider.get_meter("corral.monitor")
        self.tokens = meter.create_histogram("gen_ai.client.token.usage", unit="{token}",
                                             description="Tokens used per model call, input and output",
                                             explicit_bucket_boundaries_advisory=TOKEN_BUCKETS)
        self.duration = meter.create_histogram("gen_ai.client.operation.duration", unit="s",
                                               description="Duration of one model call (one step)",
                                               explicit_bucket_boundaries_advisory=DURATION_BUCKETS)
        gauges = {
            "corral.task.latency.p95": ("s", self._latency_p95), "corral.task.error_rate": ("1", self._errors),
            "corral.step.error_rate": ("1", self._step_errors), "corral.tokens.per_hour": ("{token}/h", self._tokens),
            "corral.cost.per_task": ("USD", self._cost_per_task), "corral.cost": ("USD", self._cost),
            "corral.breaker.state": ("1", self._breaker_state), "corral.breaker.open_time": ("s", self._open_time),
            "corral.queue.depth": ("{message}", self._queues), "corral.alerts.firing": ("{alert}", self._alerts),
            "corral.budget.reserved": ("{token}", self._reserved), "corral.budget.used": ("{token}", self._used),
        }
        for name, (unit, callback) in gauges.items():
            meter.create_observable_gauge(name, callbacks=[callback], unit=unit)

    def record(self, event: object) -> None:
        """A live step's tokens and duration."""
        match event:
            case StepCompleted():
                attributes = _attributes(event.dependency, event.model)
                self.tokens.record(event.usage.input_tokens, {**attributes, "gen_ai.token.type": "input"})
                self.tokens.record(event.usage.output_tokens, {**attributes, "gen_ai.token.type": "output"})
                self.duration.record(event.latency_ms / 1000, attributes)
            case StepFailed():
                provider, _, model = event.dependency.partition("/")
                self.duration.record(event.latency_ms / 1000,
                                     {**_attributes(event.dependency, model), "error.type": event.error})

    def shutdown(self) -> None:
        self.provider.shutdown()

    # --- observed at each export ---

    def _windows(self, pick: Callable) -> list[Observation]:
        now = self.metrics.clock()
        return [Observation(pick(self.metrics.window(scope, WINDOW, now)), {"corral.scope": scope, "corral.window":
                                                                             WINDOW})
                for scope in self.metrics.scopes.names()]

    def _latency_p95(self, _: CallbackOptions) -> list[Observation]:
        return self._windows(lambda figures: figures.latency.p95_ms / 1000)

    def _errors(self, _: CallbackOptions) -> list[Observation]:
        return self._windows(lambda figures: figures.error_rate)

    def _step_errors(self, _: CallbackOptions) -> list[Observation]:
        return self._windows(lambda figures: figures.step_error_rate)

    def _tokens(self, _: CallbackOptions) -> list[Observation]:
        return self._windows(lambda figures: figures.tokens_per_hour)

    def _cost_per_task(self, _: CallbackOptions) -> list[Observation]:
        return self._windows(lambda figures: figures.cost_per_task_usd)

    def _cost(self, _: CallbackOptions) -> list[Observation]:
        return [Observation(self.metrics.cost)]

    def _breaker_state(self, _: CallbackOptions) -> list[Observation]:
        return [Observation(0 if b.state == "closed" else 1 if b.state == "open" else 2,
                            {"corral.dependency": dependency, "corral.breaker.state": b.state})
                for dependency, b in self.metrics.breakers.items()]

    def _open_time(self, _: CallbackOptions) -> list[Observation]:
        now = self.metrics.clock()
        return [Observation(b.open_for(now), {"corral.dependency": dependency})
                for dependency, b in self.metrics.breakers.items()]

    def _queues(self, _: CallbackOptions) -> list[Observation]:
        return [Observation(depth, {"corral.consumer": durable}) for durable, depth in self.metrics.queue_depth.items()]

    def _reserved(self, _: CallbackOptions) -> list[Observation]:
        return [Observation(tokens, {"corral.tenant": tenant})
                for tenant, tokens in self.metrics.reserved_by_tenant().items()]

    def _used(self, _: CallbackOptions) -> list[Observation]:
        """Tokens each tenant's steps used over the last hour."""
        now = self.metrics.clock()
        return [Observation(self.metrics.window(scope, "1h", now).tokens, {"corral.tenant": scope[len("tenant:"):]})
                for scope in self.metrics.scopes.names() if scope.startswith("tenant:")]

    def _alerts(self, _: CallbackOptions) -> list[Observation]:
        return [Observation(1, {"corral.alert.rule": a.rule, "corral.alert.severity": a.severity,
                                "corral.scope": a.scope}) for a in self.firing()]


def _attributes(dependency: str, model: str) -> dict[str, str]:
    provider = dependency.partition("/")[0]
    return {"gen_ai.operation.name": "chat", "gen_ai.provider.name": provider, "gen_ai.request.model": model}
