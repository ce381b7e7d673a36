"""Events: facts that happened, past tense, one frozen tagged Struct each.

Every event carries the task's identity (task_id, tenant, user) and when it
happened. The tag (`kind` on the wire) is explicit, never derived from the class
name, so renaming a class never breaks a consumer. Evolve only by adding fields
with defaults; decoders ignore fields they do not know.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

import msgspec

CONTRACT_VERSION = 1

# A subject token: tenants, users and agent kinds become parts of subjects.
TOKEN_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
Token = Annotated[str, msgspec.Meta(pattern=TOKEN_PATTERN)]
TaskId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,128}$")]


def utcnow() -> datetime:
    return datetime.now(UTC)


def task_ref(tenant: str, task_id: str) -> str:
    """A task's identity inside Corral: its tenant and the publisher's id, `<tenant>.<task_id>`, so two
    tenants' task ids never meet in a key, a de-duplication id or a record. A valid KV key ('.' is in
    neither part)."""
    return f"{tenant}.{task_id}"


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind"):
    """Base of every event: who, which task, when, and the contract version."""

    task_id: TaskId
    tenant: Token
    user: Token
    occurred_at: datetime = msgspec.field(default_factory=utcnow)
    version: int = CONTRACT_VERSION

    @property
    def task_ref(self) -> str:
        """The task's identity inside Corral (`task_ref`): what keys and de-duplication ids use."""
        return task_ref(self.tenant, self.task_id)

    def dedup_key(self) -> str:
        """The `Nats-Msg-Id` of this event: the same fact published twice is stored once."""
        return f"{self.task_ref}:{type(self).__struct_config__.tag}"


# --- value types carried inside events ---------------------------------------

ErrorClass = Literal["transient", "permanent", "timeout", "rate_limited"]
RETRYABLE: frozenset[str] = frozenset({"transient", "timeout", "rate_limited"})

RejectReason = Literal[
    "invalid_request",
    "payload_too_large",
    "unknown_tenant",
    "unknown_agent",
    "over_budget",
    "rate_limited",
    "tool_forbidden",
]

FailReason = Literal["attempts_exhausted", "permanent_error", "breaker_open", "deadline_exceeded"]


class ChatMessage(msgspec.Struct, frozen=True, kw_only=True):
    role: Literal["system", "user", "assistant", "tool"]
    content: str
    name: str | None = None


class TaskSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What the publisher asks for: a prompt, or chat messages (or both: the prompt comes last, as the user)."""

    agent: Token
    prompt: str = ""
    messages: list[ChatMessage] = []
    max_tokens: int | None = None
    tools: list[str] = []
    metadata: dict[str, str] = {}

    def chat(self) -> list[ChatMessage]:
        """The conversation a model sees."""
        return [*self.messages, ChatMessage(role="user", content=self.prompt)] if self.prompt else self.messages


class TokenEstimate(msgspec.Struct, frozen=True, kw_only=True):
    """Tokens the guard expects the task to use (tiktoken count + expected output)."""

    prompt_tokens: int
    max_output_tokens: int

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.max_output_tokens


class Usage(msgspec.Struct, frozen=True, kw_only=True):
    """Tokens a model call really used."""

    input_tokens: int
    output_tokens: int
    cached_tokens: int = 0

    @property
    def total(self) -> int:
        return self.input_tokens + self.output_tokens


class Attempt(msgspec.Struct, frozen=True, kw_only=True):
    """One try of a step, as TaskFailed reports it; or a strategy skipped because its circuit was open
    (`called` false, `step_id` empty: no step was asked for)."""

    step_id: str
    dependency: str
    error: ErrorClass
    message: str
    strategy: int = 0
    """Index of the strategy in the agent's fallback chain (0: the preferred one)."""
    tier: str = ""
    called: bool = True
    """False when the dependency was not called because its circuit breaker was open."""


class Call(msgspec.Struct, frozen=True, kw_only=True):
    """One call a step made to a dependency (a model or a tool), as the breaker counts it."""

    dependency: str
    error: ErrorClass | None = None
    """None: the call succeeded."""
    latency_ms: float = 0.0
    started_at: float = 0.0
    """Unix seconds the call began (0: unknown); a call begun before the circuit's last transition is not
    counted against its new state."""


# --- the task's life ----------------------------------------------------------


class TaskSubmitted(Event, frozen=True, kw_only=True, tag="task.submitted"):
    spec: TaskSpec


class TaskValidated(Event, frozen=True, kw_only=True, tag="task.validated"):
    spec: TaskSpec
    estimate: TokenEstimate
    high_stakes_tools: list[str] = []
    """Tools this task names that need human approval before they run."""
    policy_version: int = 0
    shadow_rejection: RejectReason | None = None
    """Set in shadow mode: the reason the policy would have refused this task."""
    shadow_message: str = ""
    received_at: datetime | None = None
    """When Corral received the submission: the ingress stream's timestamp, stamped by the guard and carried
    onward. Latency is measured from it, never from the publisher's `occurred_at` (None: an older guard's)."""


class TaskRejected(Event, frozen=True, kw_only=True, tag="task.rejected"):
    reason: RejectReason
    message: str
    stage: Literal["guard", "budget"]
    retry_after_s: float | None = None
    policy_version: int = 0
    remaining_tokens: int | None = None
    """over_budget: tokens left in the window that refused the task (after its open reservations)."""
    resets_at: datetime | None = None
    """over_budget: when that window resets (UTC); None if waiting cannot help (a per-task cap)."""
    received_at: datetime | None = None
    """When Corral received the submission (see TaskValidated)."""

    def dedup_key(self) -> str:
        if self.stage == "guard" and self.received_at is not None:
            # The guard answers each submission, and a task id refused once may be submitted again (after a
            # rate limit's retry-after): one rejection per submission, the same on its redeliveries.
            return f"{self.task_ref}:task.rejected:{self.received_at.timestamp():.6f}"
        return super().dedup_key()


class TaskAdmitted(Event, frozen=True, kw_only=True, tag="task.admitted"):
    spec: TaskSpec
    estimate: TokenEstimate
    reserved_tokens: int
    window: str
    received_at: datetime | None = None
    """When Corral received the submission (see TaskValidated)."""


class TaskProgress(Event, frozen=True, kw_only=True, tag="task.progress"):
    stage: str
    message: str
    attempt: int = 0
    worker: str = ""
    step_id: str = ""
    """The step it is about, when it is about one."""

    def dedup_key(self) -> str:
        return f"{self.task_ref}:{self.step_id or self.attempt}:progress.{self.stage}:{self.worker}"


class TaskCompleted(Event, frozen=True, kw_only=True, tag="task.completed"):
    output: str
    usage: Usage
    """Tokens of all the task's completed steps (the budget waits for their StepCompleted to add up)."""
    attempts: int
    """Steps tried, over every strategy, the successful one included."""
    model: str
    strategy: int = 0
    """Index of the strategy in the fallback chain that produced the output."""
    tier: str = ""
    dependency: str = ""
    """`provider/model` that answered, or `cache` for a cached answer."""
    received_at: datetime | None = None
    """When Corral received the submission (see TaskValidated)."""


class TaskFailed(Event, frozen=True, kw_only=True, tag="task.failed"):
    reason: FailReason
    error: str
    attempts: list[Attempt]
    received_at: datetime | None = None
    """When Corral received the submission (see TaskValidated)."""


# --- steps: one model call by an agent worker ---------------------------------


class StepEvent(Event, frozen=True, kw_only=True):
    step_id: str
    attempt: int
    agent: Token

    def dedup_key(self) -> str:
        return f"{self.task_ref}:{self.step_id}:{type(self).__struct_config__.tag}"


class StepRequested(StepEvent, frozen=True, kw_only=True, tag="step.requested"):
    provider: str
    model: str
    prompt: str
    max_tokens: int
    messages: list[ChatMessage] = []
    """The whole conversation, when the task came as chat messages; `prompt` is its last user turn."""
    strategy: int = 0
    """Index of the strategy in the agent's fallback chain."""
    tier: str = ""
    tools: list[str] = []
    """Tools the step calls (each a dependency `tool/NAME` with its own breaker)."""
    timeout_s: float = 0.0
    """The worker gives up on the step after this many seconds (0: no limit)."""
    deadline_at: float = 0.0
    """Unix seconds after which the step must not start (the task's deadline or the attempt's); 0: none."""


class StepCompleted(StepEvent, frozen=True, kw_only=True, tag="step.completed"):
    dependency: str
    model: str
    output: str
    usage: Usage
    latency_ms: float
    calls: list[Call] | None = None
    """Every dependency the step called (tools, then the model), for the breakers; None from older
    workers, whose one call was `dependency`."""


class StepFailed(StepEvent, frozen=True, kw_only=True, tag="step.failed"):
    dependency: str
    """The dependency that failed (a model `provider/model` or a tool `tool/NAME`)."""
    error: ErrorClass
    message: str
    retry_after_s: float | None = None
    calls: list[Call] | None = None
    """Every dependency the step called, the failed call last, for the breakers (empty: it called none);
    None from older workers, whose one call was `dependency`."""
    latency_ms: float = 0.0
    breaker_open: bool = False
    """The worker did not call `dependency`: its circuit was open (error is then `transient`)."""


# --- signals from the breaker -------------------------------------------------

BreakerStateName = Literal["closed", "open", "half_open"]


class BreakerChanged(msgspec.Struct, frozen=True, kw_only=True, tag="breaker.changed", tag_field="kind"):
    """A dependency's circuit moved from one state to another."""

    dependency: str
    previous: BreakerStateName
    state: BreakerStateName
    consecutive_failures: int
    occurred_at: datetime = msgspec.field(default_factory=utcnow)
    version: int = CONTRACT_VERSION
    failure_rate: float = 0.0
    """Percent of failed calls in the window (or among the half-open probes) when it changed."""
    slow_call_rate: float = 0.0
    calls: int = 0
    """Calls the rates were computed over."""
    forced: bool = False
    """An operator forced this state; it holds until released."""
    reason: str = ""
    generation: int = 0
    """Counts the circuit's transitions; with the dependency it identifies this one."""
    cause_at: float = 0.0
    """Unix seconds of its cause: the end of the call that tripped or settled the circuit, the end of the wait
    in open, or the operator's command (0: unknown)."""

    def dedup_key(self) -> str:
        if self.generation:
            return f"{self.dependency}:{self.generation}"
        return f"{self.dependency}:{self.state}:{self.occurred_at.timestamp():.6f}"


# --- what the budget tells a user about cost ------------------------------------

CostReason = Literal["task", "threshold"]
BudgetWindow = Literal["day", "hour"]


class CostNotice(Event, frozen=True, kw_only=True, tag="cost.notice"):
    """What a task cost (reason "task", after it ended), or that one of the user's windows
    crossed 50, 80 or 100 % of its limit (reason "threshold", once per threshold per window)."""

    reason: CostReason
    tokens: int
    """The task's tokens ("task"), or the window's tokens used so far ("threshold")."""
    cost_usd: float
    """The task's cost ("task"), or the window's cost so far ("threshold")."""
    remaining_daily_tokens: int
    remaining_hourly_tokens: int
    window: BudgetWindow | None = None
    window_start: str = ""
    """"threshold": the window, e.g. "2026-11-27" (day) or "2026-11-27T13" (hour), UTC."""
    threshold_pct: int = 0

    def dedup_key(self) -> str:
        if self.reason == "threshold":  # one notice per threshold per window, whichever task crossed it
            return f"cost:{self.tenant}:{self.user}:{self.window}:{self.window_start}:{self.threshold_pct}"
        return f"{self.task_ref}:cost.notice"


# --- what the dead-letter stream stores --------------------------------------


DEAD_LETTER_PAYLOAD_BYTES = 4096
"""How much of a dead message its letter keeps: enough to see what it was, and a letter of any message fits in
one (the whole payload of a message near the server's maximum would not, base64-encoded)."""


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True, tag="dead.letter", tag_field="kind"):
    """A message a service could not process, kept with the reason: its first bytes, its size and its hash."""

    service: str
    subject: str
    reason: str
    payload: bytes
    """The message's first DEAD_LETTER_PAYLOAD_BYTES bytes (all of it, when it is shorter)."""
    deliveries: int = 1
    occurred_at: datetime = msgspec.field(default_factory=utcnow)
    version: int = CONTRACT_VERSION
    payload_size: int = 0
    """Bytes of the whole message."""
    payload_sha256: str = ""
    """Hex SHA-256 of the whole message, to find it (or its copies) in the stream it came from."""


TASK_EVENTS = (TaskSubmitted, TaskValidated, TaskRejected, TaskAdmitted, TaskProgress, TaskCompleted, TaskFailed)
STEP_EVENTS = (StepRequested, StepCompleted, StepFailed)
ALL_CONTRACTS = (*TASK_EVENTS, *STEP_EVENTS, CostNotice, BreakerChanged, DeadLetter)
