"""Request/reply messages of the services' NATS micro endpoints (`corral status`, `corral budget show`,
`corral cost`)."""

from __future__ import annotations

import msgspec

from datetime import datetime
from typing import Annotated, Literal

from contracts.events import Alert, AlertResolved, Attempt, BudgetWindow, Label, Message, TaskId, Token, TokenSum, Usage


class Percentiles(msgspec.Struct, frozen=True, kw_only=True):
    count: int = 0
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    p99_ms: float = 0.0


class WindowFigures(msgspec.Struct, frozen=True, kw_only=True):
    """What one scope saw over one sliding window, from the events' stream receipt times."""

    latency: Percentiles = Percentiles()
    """Receipt of the submission (the ingress stream's time) to the task's end (the tasks stream's time)."""
    tasks: int = 0
    error_rate: float = 0.0
    """Failed / ended tasks."""
    steps: int = 0
    step_error_rate: float = 0.0
    tokens: int = 0
    tokens_per_hour: float = 0.0
    cost_usd: float = 0.0
    cost_per_task_usd: float = 0.0
    """Cost of the window's steps / tasks ended in it."""


class ScopeReport(msgspec.Struct, frozen=True, kw_only=True):
    scope: str
    """`all`, `tenant:NAME`, `agent:NAME` or `model:NAME`."""
    windows: dict[str, WindowFigures]
    """`1m`, `5m`, `1h` -> figures."""


class BreakerTime(msgspec.Struct, frozen=True, kw_only=True):
    dependency: str
    state: str
    open_for_s: float = 0.0
    """Seconds since it opened, if it is open now (half-open counts as open); else 0."""
    open_total_s: float = 0.0
    """Seconds it spent open, in all, as far as the streams tell."""


class Savings(msgspec.Struct, frozen=True, kw_only=True):
    """What the response cache, coalescing and prompt compaction kept from being spent (docs/caching.md)."""

    hits: dict[str, int] = {}
    """Steps answered without their model call, by source (exact, semantic, coalesced)."""
    tokens_saved: int = 0
    cost_avoided_usd: float = 0.0
    compacted_steps: int = 0
    tokens_before_compaction: int = 0
    tokens_after_compaction: int = 0


class StatusReport(msgspec.Struct, frozen=True, kw_only=True):
    """What the monitor has seen since it started."""

    counts: dict[str, int]
    """Events seen, by kind (task.completed, step.failed, …)."""
    latency: Percentiles
    """Receipt (the ingress stream's time) to terminal event, over the most recent tasks."""
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
    scopes: list[ScopeReport] = []
    """The sliding windows (1m, 5m, 1h) of `all`, and of each tenant, agent kind and model it has seen (at most
    the monitor's scope limit, the rest in `tenant:other`, `agent:other`, `model:other`)."""
    breaker_times: list[BreakerTime] = []
    """Per dependency: its circuit's state and how long it has been (and was, in all) open."""
    positions: dict[str, int] = {}
    """Stream -> the last sequence the figures include."""
    replica: str = ""
    """Which monitor replica answered (each reads every event, so each answers the same)."""
    reserved_tokens: dict[str, int] = {}
    """Tenant -> tokens its admitted, unfinished tasks hold (what the budget reserved for them)."""
    savings: Savings = Savings()


class TaskStatusQuery(msgspec.Struct, frozen=True, kw_only=True):
    task_id: TaskId
    tenant: Token = "default"
    """The task's tenant: task ids are the publishers', so two tenants may use the same one."""


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
    waiting_for_approval: list[str] = []
    """Ids of the approvals the task waits for (`corral approvals show ID`); empty: it waits for none."""


class BudgetQuery(msgspec.Struct, frozen=True, kw_only=True):
    tenant: Token
    user: Token


class WindowUse(msgspec.Struct, frozen=True, kw_only=True):
    """One budget window of a user or of their tenant, as the budget service books it."""

    scope: Literal["user", "tenant"]
    window: BudgetWindow
    start: str
    """"2026-11-27" (day) or "2026-11-27T13" (hour), UTC."""
    limit: int
    used: int
    """Tokens posted by finished and running steps in this window."""
    reserved: int
    """Tokens held for admitted tasks that have not used them yet."""
    remaining: int
    """limit - used - reserved: what the next admission may reserve."""
    cost_usd: float
    resets_at: datetime


class BudgetReply(msgspec.Struct, frozen=True, kw_only=True):
    tenant: str
    user: str
    windows: list[WindowUse]
    open_tasks: int
    """The user's tasks that hold a reservation now."""
    per_task_tokens: int | None = None


class CostQuery(msgspec.Struct, frozen=True, kw_only=True):
    task_id: TaskId
    tenant: Token = "default"
    """The task's tenant: task ids are the publishers', so two tenants may use the same one."""


class StepCost(msgspec.Struct, frozen=True, kw_only=True):
    """One step as the budget posted it (its journal keeps these)."""

    step_id: str
    model: str
    usage: Usage
    cost_usd: float
    over_reservation: int = 0
    """Tokens this step used beyond what its task still had reserved (posted anyway, flagged)."""
    posted_at: datetime | None = None
    saved: str = ""
    """How the step was answered without its model call (`exact`, `semantic`, `coalesced`); empty: it called."""
    saved_tokens: int = 0
    """Tokens that call would have used (docs/caching.md)."""
    saved_usd: float = 0.0
    failed: str = ""
    """The error class of a step that failed after its model calls used these tokens; empty: it answered."""


class ModelCost(msgspec.Struct, frozen=True, kw_only=True):
    model: str
    steps: int
    input_tokens: int
    output_tokens: int
    cached_tokens: int
    cost_usd: float


class CostReply(msgspec.Struct, frozen=True, kw_only=True):
    task_id: str
    found: bool
    tenant: str = ""
    user: str = ""
    status: str = ""
    """admitted (running), rejected, finished or expired (its reservation timed out)."""
    reserved_tokens: int = 0
    """What the task reserved at admission."""
    tokens: int = 0
    cost_usd: float = 0.0
    steps: list[StepCost] = []
    models: list[ModelCost] = []
    saved_tokens: int = 0
    """Tokens the task did not spend: its steps answered from the response cache or by a coalesced call."""
    saved_usd: float = 0.0


QUERY_CONTRACTS = (StatusReport, TaskStatusQuery, TaskStatusReply, BudgetQuery, BudgetReply, CostQuery, CostReply)


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


class AlertsQuery(msgspec.Struct, frozen=True, kw_only=True):
    """`corral alerts`: what fires now; with `history`, the latest firings and resolutions too."""

    history: bool = False


class SilenceAlert(msgspec.Struct, frozen=True, kw_only=True):
    """`corral alerts silence RULE --for 1h`: the rule neither fires nor sends until then (0 s: lift it)."""

    rule: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    for_s: Annotated[float, msgspec.Meta(ge=0, le=366 * 24 * 3600)]
    by: Label = ""


class AlertsReply(msgspec.Struct, frozen=True, kw_only=True):
    firing: list[Alert] = []
    history: list[Alert | AlertResolved] = []
    silences: dict[str, float] = {}
    """rule -> Unix seconds when its silence ends."""
    policy_change: dict[str, float] = {}
    """The latest policy change the monitor saw: version, previous, at (Unix seconds), rolled_back (0/1)."""


QUERY_CONTRACTS = (*QUERY_CONTRACTS, AlertsQuery, SilenceAlert, AlertsReply)


class ReservationReply(msgspec.Struct, frozen=True, kw_only=True):
    """The budget's answer to ExtendReservation."""

    granted: bool
    tokens: TokenSum = 0
    """Granted: what the part holds (a repeated request is answered with the first one's amount)."""
    message: Message = ""
    """Why not: which window refused, what is left, when it resets (or that the task's hold has ended)."""
    remaining_tokens: TokenSum | None = None
    resets_at: datetime | None = None


QUERY_CONTRACTS = (*QUERY_CONTRACTS, ReservationReply)
