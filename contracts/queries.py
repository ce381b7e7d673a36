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
    strategy: int = 0
    """Index in the fallback chain of the strategy running (or that ran last)."""
    step_id: str = ""


QUERY_CONTRACTS = (StatusReport, TaskStatusQuery, TaskStatusReply)


class ProbeGrant(msgspec.Struct, frozen=True, kw_only=True):
    """The breaker's answer to AcquireProbe."""

    granted: bool
    """True: make the call (a lease is held for it, or the circuit is closed)."""
    state: str
    reason: str = ""


class BreakerReply(msgspec.Struct, frozen=True, kw_only=True):
    """The breaker's answer to ControlBreaker: the circuit as it is now."""

    dependency: str
    state: str
    forced: bool
    reason: str = ""


class SimulationAck(msgspec.Struct, frozen=True, kw_only=True):
    """One worker replica's answer to SimulateDependency."""

    worker: str
    agent: str
    dependency: str
    mode: str


QUERY_CONTRACTS = (*QUERY_CONTRACTS, ProbeGrant, BreakerReply, SimulationAck)
