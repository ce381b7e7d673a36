"""What a live view shows, from the monitor's StatusReports polled one after another.

The monitor reports totals (events seen, cost so far) and its own windowed figures (latency
percentiles, tokens in the last hour). Rates are the view's: tasks per second between recent reports,
cost per hour over the reports of the last hour. A monitor that restarted reports smaller totals; the
view then starts its rates afresh rather than showing negative ones.

Alerts and approvals are shown when the view is given them (`History.add(..., alerts=, approvals_waiting=)`,
from wherever they are asked) or the report carries them (`alerts`, `approvals_waiting`); without either,
the view says nothing of them. `observe` asks the monitor for its report and the alerts firing, and the approvals service what waits.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import msgspec

from contracts.queries import StatusReport

HOUR_S = 3600.0
THROUGHPUT_SPAN_S = 10.0
"""Tasks per second are counted over the reports of the last few seconds: one second's alone jitters."""
TOP_TENANTS = 5
"""Tenants a sample shows figures of: the busiest over the last hour."""


class ScopeLine(msgspec.Struct, frozen=True, kw_only=True):
    """One scope's windows in a line: tasks over each window, the 5-minute latency p95 and error rate, the
    hour's tokens and cost per task."""

    scope: str
    tasks: dict[str, int]
    """Window (`1m`, `5m`, `1h`) -> tasks ended in it."""
    p95_ms: float
    error_rate: float
    tokens_per_hour: float
    cost_per_task_usd: float


def scope_lines(scopes: list, kind: str = "", limit: int | None = None) -> list[ScopeLine]:
    """A line per scope of the report (only `kind` ones, e.g. `tenant`, when given), in the report's order;
    with `limit`, the busiest that many by the hour's tasks."""
    chosen = [scope for scope in scopes if not kind or scope.scope.startswith(f"{kind}:")]
    if limit is not None:
        chosen = sorted(chosen, key=lambda scope: -scope.windows["1h"].tasks)[:limit]
    return [ScopeLine(scope=scope.scope, tasks={window: figures.tasks for window, figures in scope.windows.items()},
                      p95_ms=scope.windows["5m"].latency.p95_ms, error_rate=scope.windows["5m"].error_rate,
                      tokens_per_hour=scope.windows["1h"].tokens_per_hour,
                      cost_per_task_usd=scope.windows["1h"].cost_per_task_usd)
            for scope in chosen]


class Sample(msgspec.Struct, frozen=True, kw_only=True):
    """One moment of the system as a view draws it."""

    at: float
    """Unix seconds when the view had the report."""
    tasks_done: int
    tasks_failed: int
    tasks_per_s: float
    steps_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    error_rate: float
    step_error_rate: float
    tokens_per_hour: int
    cost_per_hour_usd: float
    cost_per_task_usd: float
    queue_depth: dict[str, int]
    breakers: dict[str, str]
    alerts: list[dict[str, Any]] | None = None
    """Firing alerts, when the monitor reports them."""
    approvals_waiting: int | None = None
    """Approvals waiting for a person, when the monitor reports them."""
    tenants: list[ScopeLine] = []
    """The busiest tenants' windows (TOP_TENANTS of them)."""


class _Totals(msgspec.Struct, frozen=True):
    """What the rates are computed from: one report's totals, when the view had it."""

    at: float
    tasks: int
    steps: int
    cost_usd: float

    @classmethod
    def of(cls, report: StatusReport, at: float) -> _Totals:
        counts = report.counts
        return cls(at, counts.get("task.completed", 0) + counts.get("task.failed", 0),
                   counts.get("step.completed", 0) + counts.get("step.failed", 0), report.cost_usd)


def _per_s(now: _Totals, then: _Totals, count: str) -> float:
    span = now.at - then.at
    return max(0.0, (getattr(now, count) - getattr(then, count)) / span) if span > 0 else 0.0


def _optional(report: StatusReport, name: str) -> Any:
    value = getattr(report, name, None)
    return None if value is None else msgspec.to_builtins(value)


class History:
    """The last hour: the totals of each report (for rates) and the sample each one made."""

    def __init__(self, keep_s: float = HOUR_S) -> None:
        self.keep_s = keep_s
        self.totals: deque[_Totals] = deque()
        self.samples: deque[Sample] = deque()

    def add(self, report: StatusReport, at: float, *, alerts: list | None = None,
            approvals_waiting: int | None = None) -> Sample:
        totals = _Totals.of(report, at)
        if self.totals and (totals.tasks < self.totals[-1].tasks or totals.cost_usd < self.totals[-1].cost_usd):
            self.totals.clear()  # the monitor restarted: its totals began again
        self.totals.append(totals)
        while self.totals[0].at < at - self.keep_s:
            self.totals.popleft()
        sample = self._sample(totals, report)
        if alerts is not None or approvals_waiting is not None:
            sample = msgspec.structs.replace(
                sample, alerts=sample.alerts if alerts is None else msgspec.to_builtins(alerts),
                approvals_waiting=sample.approvals_waiting if approvals_waiting is None else approvals_waiting)
        self.samples.append(sample)
        while self.samples[0].at < at - self.keep_s:
            self.samples.popleft()
        return sample

    def _sample(self, now: _Totals, report: StatusReport) -> Sample:
        recent = next(t for t in self.totals if t.at >= now.at - THROUGHPUT_SPAN_S)  # now itself when alone
        oldest = self.totals[0]
        span = now.at - oldest.at
        cost_per_hour = (now.cost_usd - oldest.cost_usd) / span * HOUR_S if span > 0 else 0.0
        waiting = _optional(report, "approvals_waiting")
        return Sample(
            at=now.at, tasks_done=report.counts.get("task.completed", 0),
            tasks_failed=report.counts.get("task.failed", 0),
            tasks_per_s=round(_per_s(now, recent, "tasks"), 3), steps_per_s=round(_per_s(now, recent, "steps"), 3),
            p50_ms=report.latency.p50_ms, p95_ms=report.latency.p95_ms, p99_ms=report.latency.p99_ms,
            error_rate=report.error_rate, step_error_rate=report.step_error_rate,
            tokens_per_hour=report.tokens_last_hour, cost_per_hour_usd=round(max(0.0, cost_per_hour), 6),
            cost_per_task_usd=report.cost_per_task_usd, queue_depth=dict(report.queue_depth),
            breakers=dict(report.breakers), alerts=_optional(report, "alerts"),
            tenants=scope_lines(report.scopes, "tenant", TOP_TENANTS),
            approvals_waiting=len(waiting) if isinstance(waiting, list) else waiting if isinstance(waiting, int) else None)


async def observe(client, history: History, at: float, timeout: float = 5.0) -> Sample:
    """One sample: the monitor's report, with the alerts firing and the approvals waiting (each left out when
    its service does not answer)."""
    from contracts.approvals import ListApprovals

    report = await client.status(timeout=timeout)
    firing = await _or_none(lambda: client.alerts(timeout=timeout))
    waiting = await _or_none(lambda: client.approvals(ListApprovals(limit=1000), timeout=timeout))
    return history.add(report, at, alerts=None if firing is None else firing.firing,
                       approvals_waiting=None if waiting is None else len(waiting.approvals))


async def _or_none(ask):
    from nats.errors import Error as NatsError

    try:
        return await ask()
    except (TimeoutError, NatsError, msgspec.DecodeError, msgspec.ValidationError):
        return None
