"""What a live view shows, from the monitor's StatusReports polled one after another.

The monitor reports totals (events seen, cost so far) and its own windowed figures (latency
percentiles, tokens in the last hour). Rates are the view's: tasks per second between recent reports,
cost per hour over the reports of the last hour. A monitor that restarted reports smaller totals; the
view then starts its rates afresh rather than showing negative ones.

Alerts and approvals are shown when the report carries them (`alerts`, `approvals_waiting`): a monitor
that has neither reports neither, and the view says nothing of them.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import msgspec

from contracts.queries import StatusReport

HOUR_S = 3600.0
THROUGHPUT_SPAN_S = 10.0
"""Tasks per second are counted over the reports of the last few seconds: one second's alone jitters."""


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


def _tasks(report: StatusReport) -> int:
    return report.counts.get("task.completed", 0) + report.counts.get("task.failed", 0)


def _steps(report: StatusReport) -> int:
    return report.counts.get("step.completed", 0) + report.counts.get("step.failed", 0)


def _rate(now: tuple[float, StatusReport], then: tuple[float, StatusReport], count) -> float:
    span = now[0] - then[0]
    return max(0.0, (count(now[1]) - count(then[1])) / span) if span > 0 else 0.0


def _optional(report: StatusReport, name: str) -> Any:
    value = getattr(report, name, None)
    return None if value is None else msgspec.to_builtins(value)


class History:
    """The last hour of reports, and the sample each one makes."""

    def __init__(self, keep_s: float = HOUR_S) -> None:
        self.keep_s = keep_s
        self.reports: deque[tuple[float, StatusReport]] = deque()
        self.samples: deque[Sample] = deque()

    def add(self, report: StatusReport, at: float) -> Sample:
        if self.reports and (_tasks(report) < _tasks(self.reports[-1][1])
                             or report.cost_usd < self.reports[-1][1].cost_usd):
            self.reports.clear()  # the monitor restarted: its totals began again
        self.reports.append((at, report))
        while self.reports[0][0] < at - self.keep_s:
            self.reports.popleft()
        sample = self._sample(at, report)
        self.samples.append(sample)
        while self.samples[0].at < at - self.keep_s:
            self.samples.popleft()
        return sample

    def _recent(self, at: float) -> tuple[float, StatusReport]:
        """The oldest report within the throughput span (the newest one itself when it is alone)."""
        return next(entry for entry in self.reports if entry[0] >= at - THROUGHPUT_SPAN_S)

    def _sample(self, at: float, report: StatusReport) -> Sample:
        now, recent, oldest = (at, report), self._recent(at), self.reports[0]
        span = at - oldest[0]
        cost_per_hour = (report.cost_usd - oldest[1].cost_usd) / span * HOUR_S if span > 0 else 0.0
        waiting = _optional(report, "approvals_waiting")
        return Sample(
            at=at, tasks_done=report.counts.get("task.completed", 0), tasks_failed=report.counts.get("task.failed", 0),
            tasks_per_s=round(_rate(now, recent, _tasks), 3), steps_per_s=round(_rate(now, recent, _steps), 3),
            p50_ms=report.latency.p50_ms, p95_ms=report.latency.p95_ms, p99_ms=report.latency.p99_ms,
            error_rate=report.error_rate, step_error_rate=report.step_error_rate,
            tokens_per_hour=report.tokens_last_hour, cost_per_hour_usd=round(max(0.0, cost_per_hour), 6),
            cost_per_task_usd=report.cost_per_task_usd, queue_depth=dict(report.queue_depth),
            breakers=dict(report.breakers), alerts=_optional(report, "alerts"),
            approvals_waiting=len(waiting) if isinstance(waiting, list) else waiting if isinstance(waiting, int) else None)
