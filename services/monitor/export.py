"""The monitor's figures in Prometheus' text exposition format (version 0.0.4), for `/metrics`.

Windowed figures are gauges labelled by scope (`all`, `tenant:…`, `agent:…`, `model:…`) and window (`1m`,
`5m`, `1h`); totals since the streams' oldest event the monitor folded are counters.
"""

from __future__ import annotations

from collections.abc import Iterable

from contracts.events import Alert
from services.monitor.figures import WINDOWS
from services.monitor.handlers import Metrics

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
QUANTILES = (("0.5", "p50_ms"), ("0.95", "p95_ms"), ("0.99", "p99_ms"))
BREAKER_STATES = ("closed", "open", "half_open")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{name}="{_escape(value)}"' for name, value in labels.items()) + "}"


class Family:
    """One metric: its HELP and TYPE lines, then a sample per label set."""

    def __init__(self, name: str, kind: str, help_: str) -> None:
        self.name, self.kind, self.help = name, kind, help_
        self.samples: list[tuple[dict[str, str], float]] = []

    def add(self, value: float, **labels: str) -> None:
        self.samples.append((labels, value))

    def lines(self) -> Iterable[str]:
        name = f"{self.name}_total" if self.kind == "counter" else self.name
        yield f"# HELP {name} {self.help}"
        yield f"# TYPE {name} {self.kind}"
        for labels, value in self.samples:
            yield f"{name}{_labels(labels)} {float(value)!r}"


def render(metrics: Metrics, firing: Iterable[Alert], now: float) -> bytes:
    families = [*_windowed(metrics, now), *_totals(metrics), *_breakers(metrics, now), _queues(metrics),
                _alerts(firing)]
    return ("\n".join(line for family in families for line in family.lines()) + "\n").encode()


def _windowed(metrics: Metrics, now: float) -> list[Family]:
    latency = Family("corral_task_latency_seconds", "gauge",
                     "Receipt to end of tasks, by quantile, over a sliding window (Corral's own timestamps).")
    tasks = Family("corral_window_tasks", "gauge", "Tasks ended in the window.")
    errors = Family("corral_task_error_rate", "gauge", "Failed / ended tasks in the window.")
    step_errors = Family("corral_step_error_rate", "gauge", "Failed / ended steps in the window.")
    tokens = Family("corral_tokens_per_hour", "gauge", "Tokens of the window's steps, per hour.")
    cost = Family("corral_cost_per_task_usd", "gauge", "Cost of the window's steps / tasks ended in it (USD).")
    for scope in metrics.scopes.names():
        for window in WINDOWS:
            figures = metrics.window(scope, window, now)
            labels = {"scope": scope, "window": window}
            for quantile, field in QUANTILES:
                latency.add(getattr(figures.latency, field) / 1000, quantile=quantile, **labels)
            tasks.add(figures.tasks, **labels)
            errors.add(figures.error_rate, **labels)
            step_errors.add(figures.step_error_rate, **labels)
            tokens.add(figures.tokens_per_hour, **labels)
            cost.add(figures.cost_per_task_usd, **labels)
    return [latency, tasks, errors, step_errors, tokens, cost]


def _totals(metrics: Metrics) -> list[Family]:
    events = Family("corral_events", "counter", "Events the monitor folded in, by kind.")
    for kind, count in sorted(metrics.counts.items()):
        events.add(count, kind=kind)
    cost = Family("corral_cost_usd", "counter", "Cost of every step the monitor folded in (USD).")
    cost.add(metrics.cost)
    reserved = Family("corral_budget_reserved_tokens", "gauge", "Tokens admitted, unfinished tasks hold, by tenant.")
    for tenant, tokens in sorted(metrics.reserved_by_tenant().items()):
        reserved.add(tokens, tenant=tenant)
    return [events, cost, reserved]


def _breakers(metrics: Metrics, now: float) -> list[Family]:
    state = Family("corral_breaker_state", "gauge", "1 for the circuit's current state, 0 for the others.")
    open_for = Family("corral_breaker_open_seconds", "gauge", "Seconds since the circuit opened (0: closed).")
    open_total = Family("corral_breaker_open_seconds_spent", "counter", "Seconds the circuit spent open, in all.")
    for dependency, breaker in sorted(metrics.breakers.items()):
        for name in BREAKER_STATES:
            state.add(1.0 if breaker.state == name else 0.0, dependency=dependency, state=name)
        open_for.add(breaker.open_for(now), dependency=dependency)
        open_total.add(breaker.open_total_s + breaker.open_for(now), dependency=dependency)
    return [state, open_for, open_total]


def _queues(metrics: Metrics) -> Family:
    depth = Family("corral_queue_depth", "gauge", "Messages pending or unacknowledged, per durable consumer.")
    for durable, value in sorted(metrics.queue_depth.items()):
        depth.add(value, consumer=durable)
    return depth


def _alerts(firing: Iterable[Alert]) -> Family:
    family = Family("corral_alerts_firing", "gauge", "1 per alert firing now.")
    for alert in firing:
        family.add(1.0, rule=alert.rule, severity=alert.severity, scope=alert.scope)
    return family
