"""Request/reply messages of the services' NATS micro endpoints (`corral status`)."""

from __future__ import annotations

import msgspec

from contracts.events import Attempt, Usage


class Percentiles(msgspec.Struct, frozen=True, kw_only=True):
    count: int = 0
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    p99_ms: float = 0.0


class StatusReport(msgspec.Struct, frozen=True, kw_only=True):
    """What the monitor has seen since it started."""

    counts: dict[str, int]
    """Events seen, by kind (task.completed, step.failed, …)."""
    latency: Percentiles
    """Submission to terminal event, over the most recent tasks."""
    error_rate: float
    """Failed / (completed + failed) tasks."""
    step_error_rate: float
    tokens_last_hour: int
    cost_usd: float
    cost_per_task_usd: float
    queue_depth: dict[str, int]
    """Messages pending or unacknowledged per durable consumer."""
    breakers: dict[str, str]
    """Dependency -> circuit state, from BreakerChanged events."""
    uptime_s: float


class TaskStatusQuery(msgspec.Struct, frozen=True, kw_only=True):
    task_id: str


class TaskStatusReply(msgspec.Struct, frozen=True, kw_only=True):
    task_id: str
    found: bool
    status: str = "unknown"
    agent: str = ""
    attempt: int = 0
    attempts: list[Attempt] = []
    usage: Usage | None = None


QUERY_CONTRACTS = (StatusReport, TaskStatusQuery, TaskStatusReply)
