"""Events: facts that happened, past tense, one frozen tagged Struct each.

Every event carries the task's identity (task_id, tenant, user) and when it
happened. The tag (`kind` on the wire) is explicit, never derived from the class
name, so renaming a class never breaks a consumer. Evolve only by adding fields
with defaults; decoders ignore fields they do not know.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Annotated, Literal

import msgspec

CONTRACT_VERSION = 1

# A subject token: tenants, users and agent kinds become parts of subjects.
TOKEN_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
Token = Annotated[str, msgspec.Meta(pattern=TOKEN_PATTERN)]
TaskId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,128}$")]

# --- bounds -------------------------------------------------------------------------------------------------
# Every field has a range, a pattern or a length, checked at decoding and published in the JSON Schemas, so a
# publisher learns them before it sends. The maxima are far beyond any real workload (each says why): only
# nonsense meets them. The types are not recursive, so a decoded event is at most a few levels deep; JSON
# nested deeper in a field an event does not know raises RecursionError, which its consumer dead-letters.

TokenCount = Annotated[int, msgspec.Meta(ge=0, le=10_000_000)]
"""Tokens of one model call or estimate. The largest context windows hold about 2 million."""
TokenSum = Annotated[int, msgspec.Meta(ge=0, le=10**12)]
"""Tokens over many calls (a window's, a reservation): budgets of a trillion tokens are not a real thing."""
SignedTokenSum = Annotated[int, msgspec.Meta(ge=-(10**12), le=10**12)]
"""What a window has left: below zero when steps used more than their task reserved."""
Usd = Annotated[float, msgspec.Meta(ge=0.0, le=1e9)]
Percent = Annotated[float, msgspec.Meta(ge=0.0, le=100.0)]
Count = Annotated[int, msgspec.Meta(ge=0, le=1_000_000)]
"""Attempts, strategies, deliveries: a task tries a handful."""
BigCount = Annotated[int, msgspec.Meta(ge=0, le=10**15)]
"""Counters that grow for ever (a circuit's calls and transitions)."""
Millis = Annotated[float, msgspec.Meta(ge=0.0, le=366 * 86_400_000.0)]
Seconds = Annotated[float, msgspec.Meta(ge=0.0, le=366 * 86_400.0)]
"""Durations: a timeout or a retry-after of more than a year is not one."""
UnixSeconds = Annotated[float, msgspec.Meta(ge=0.0, le=1e10)]
"""A point in time (0: unknown); 1e10 is the year 2286."""
Version = Annotated[int, msgspec.Meta(ge=0, le=1_000_000)]
Timestamp = Annotated[datetime, msgspec.Meta(extra_json_schema={"format": "date-time", "maxLength": 64})]
"""RFC 3339, as msgspec writes and reads it (its schema says no more than `string`)."""
StepId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_=/-]{1,256}$")]
"""`<tenant>/<task>-s<strategy>a<attempt>` (services.executor.state.step_id): a valid KV key and subject token."""
MaybeStepId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_=/-]{0,256}$")]
"""A step id, or empty where no step was asked for."""
_KV_KEY = r"[A-Za-z0-9_.=/-]"  # what a NATS KV key may hold; breakers are keyed by dependency
DependencyKey = Annotated[str, msgspec.Meta(pattern=rf"^{_KV_KEY}{{1,192}}$")]
"""`provider/model`, `tool/NAME` or `cache` (contracts.state)."""
MaybeDependencyKey = Annotated[str, msgspec.Meta(pattern=rf"^{_KV_KEY}{{0,192}}$")]
ModelName = Annotated[str, msgspec.Meta(pattern=rf"^{_KV_KEY}{{0,128}}$")]
"""Part of a dependency key, so of its alphabet."""
ToolName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
"""A tool a task may name; `tool/NAME` is its breaker's key."""
Text = Annotated[str, msgspec.Meta(max_length=1 << 20)]
"""Prompts, message contents, outputs: no NATS message of the default maximum holds more (1 MiB). The
policy's limits (`limits.max_prompt_bytes`) are what the guard enforces; this is the backstop."""
MAX_MESSAGE_CHARS = 16_384
Message = Annotated[str, msgspec.Meta(max_length=MAX_MESSAGE_CHARS)]
"""Reasons, errors and progress in words: an error page quoted whole would be longer; its producer clips it."""
Label = Annotated[str, msgspec.Meta(max_length=256)]
"""Tiers, stages, window names, replica names."""
MetadataKey = Annotated[str, msgspec.Meta(max_length=256)]
MetadataValue = Annotated[str, msgspec.Meta(max_length=65_536)]
MAX_ITEMS = 1024
"""Entries of any list or map a publisher may send (messages, tools, metadata; the policy allows far fewer)."""


def clip(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`text`, cut to `limit` characters (the last one an ellipsis) when longer: for words a service puts in a
    bounded field (a provider's error text, an exception's)."""
    return text if len(text) <= limit else f"{text[:limit - 1]}…"


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
    occurred_at: Timestamp = msgspec.field(default_factory=utcnow)
    version: Version = CONTRACT_VERSION

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

FailReason = Literal["attempts_exhausted", "permanent_error", "breaker_open", "deadline_exceeded", "over_budget"]
"""over_budget: a part of a plan needed more than the task had reserved, and the budget could not give it."""


class ChatMessage(msgspec.Struct, frozen=True, kw_only=True):
    role: Literal["system", "user", "assistant", "tool"]
    content: Text
    name: Token | None = None


Orchestration = Literal["single", "centralized", "distributed", "hybrid"]
"""How a task's subtasks are coordinated: `single`, one agent (no plan); `centralized`, the executor starts each
subtask when its inputs are ready; `distributed`, agent pools claim subtasks from the task's board; `hybrid`,
pools claim, the executor supervises and hands over what no pool claims."""
OnFailure = Literal["fail_fast", "best_effort"]
SubtaskId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,32}$")]
OutputCap = Annotated[int, msgspec.Meta(ge=1, le=10_000_000)]


class Subtask(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One node of a plan: an agent kind's instruction, run once the subtasks it `needs` have answered (their
    outputs come with it)."""

    id: SubtaskId
    agent: Token
    instruction: Text
    needs: Annotated[list[SubtaskId], msgspec.Meta(max_length=MAX_ITEMS)] = []
    tools: Annotated[list[ToolName], msgspec.Meta(max_length=MAX_ITEMS)] = []
    max_tokens: OutputCap | None = None
    requires_approval: bool = False
    """A person approves the subtask's step before it runs (contracts/approvals.py)."""


class Plan(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A DAG of subtasks, then a synthesis over their outputs. It comes from the publisher, or from the task's
    manager agent as structured output validated against this contract."""

    subtasks: Annotated[list[Subtask], msgspec.Meta(min_length=1, max_length=MAX_ITEMS)]
    synthesis: Token | None = None
    """The agent kind that puts the results together; None: the task's own agent (`TaskSpec.agent`)."""
    on_failure: OnFailure = "fail_fast"
    """`fail_fast`: the first subtask that fails fails the task (the others are cancelled); `best_effort`: the
    synthesis runs over what succeeded, told what is missing."""


class TaskSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What the publisher asks for: a prompt, or chat messages (or both: the prompt comes last, as the user)."""

    agent: Token
    """The agent that answers; in an orchestrated task, the manager that plans (without a `plan`) and, unless
    the plan names another, synthesises."""
    prompt: Text = ""
    messages: Annotated[list[ChatMessage], msgspec.Meta(max_length=MAX_ITEMS)] = []
    max_tokens: Annotated[int, msgspec.Meta(ge=1, le=10_000_000)] | None = None
    tools: Annotated[list[ToolName], msgspec.Meta(max_length=MAX_ITEMS)] = []
    metadata: Annotated[dict[MetadataKey, MetadataValue], msgspec.Meta(max_length=MAX_ITEMS)] = {}
    orchestration: Orchestration = "single"
    plan: Plan | None = None
    """The publisher's plan; None in an orchestrated task: the manager agent (`agent`) makes one."""

    def chat(self) -> list[ChatMessage]:
        """The conversation a model sees."""
        return [*self.messages, ChatMessage(role="user", content=self.prompt)] if self.prompt else self.messages


class TokenEstimate(msgspec.Struct, frozen=True, kw_only=True):
    """Tokens the guard expects the task to use (tiktoken count + expected output)."""

    prompt_tokens: TokenCount
    max_output_tokens: TokenCount

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.max_output_tokens


class Usage(msgspec.Struct, frozen=True, kw_only=True):
    """Tokens a model call really used."""

    input_tokens: TokenCount
    output_tokens: TokenCount
    cached_tokens: TokenCount = 0
    estimated: bool = False
    """The provider reported no usage: the worker counted the tokens with tiktoken."""
    batched: bool = False
    """The calls went through the provider's batch API, at its batch price (contracts.policy.Price.batch)."""

    @property
    def total(self) -> int:
        return self.input_tokens + self.output_tokens

    @classmethod
    def sum(cls, usages: Iterable[Usage | None]) -> Usage:
        """The usages added up (None ones left out); estimated if any of them was, batched only if every one
        that used tokens was (a mix is billed at the full price)."""
        found = [usage for usage in usages if usage is not None]
        used = [usage for usage in found if usage.total]
        return cls(input_tokens=sum(u.input_tokens for u in found), output_tokens=sum(u.output_tokens for u in found),
                   cached_tokens=sum(u.cached_tokens for u in found), estimated=any(u.estimated for u in found),
                   batched=bool(used) and all(u.batched for u in used))


class Attempt(msgspec.Struct, frozen=True, kw_only=True):
    """One try of a step, as TaskFailed reports it; or a strategy skipped because its circuit was open
    (`called` false, `step_id` empty: no step was asked for)."""

    step_id: MaybeStepId
    dependency: DependencyKey
    error: ErrorClass
    message: Message
    strategy: Count = 0
    """Index of the strategy in the agent's fallback chain (0: the preferred one)."""
    tier: Label = ""
    called: bool = True
    """False when the dependency was not called because its circuit breaker was open."""
    usage: Usage | None = None
    """Tokens the failed step used (its StepFailed's usage): billed, and in the task's usage."""


class Call(msgspec.Struct, frozen=True, kw_only=True):
    """One call a step made to a dependency (a model or a tool), as the breaker counts it."""

    dependency: DependencyKey
    error: ErrorClass | None = None
    """None: the call succeeded."""
    latency_ms: Millis = 0.0
    started_at: UnixSeconds = 0.0
    """Unix seconds the call began (0: unknown); a call begun before the circuit's last transition is not
    counted against its new state."""


class CacheHit(msgspec.Struct, frozen=True, kw_only=True):
    """A step answered without its model call: from the response cache or by another task's call in flight."""

    source: Literal["exact", "semantic", "coalesced"]
    saved: Usage
    """What the model call that made the answer used: the tokens this step did not spend."""
    cost_avoided_usd: Usd = 0.0
    """`saved` at the model's price, less what the step was billed."""
    similarity: Annotated[float, msgspec.Meta(ge=-1.0, le=1.0)] = 1.0
    """Semantic hits: the cosine similarity of this request and the cached one."""
    stored_at: UnixSeconds = 0.0


class PromptCompacted(msgspec.Struct, frozen=True, kw_only=True):
    """The step's prompt was compacted before the model saw it (an agent's `compaction` policy)."""

    tokens_before: TokenCount
    tokens_after: TokenCount
    dropped_turns: Count = 0


# --- the task's life ----------------------------------------------------------


class TaskSubmitted(Event, frozen=True, kw_only=True, tag="task.submitted"):
    spec: TaskSpec


class TaskValidated(Event, frozen=True, kw_only=True, tag="task.validated"):
    spec: TaskSpec
    estimate: TokenEstimate
    high_stakes_tools: Annotated[list[ToolName], msgspec.Meta(max_length=MAX_ITEMS)] = []
    """Tools this task names that need human approval before they run."""
    policy_version: Version = 0
    shadow_rejection: RejectReason | None = None
    """Set in shadow mode: the reason the policy would have refused this task."""
    shadow_message: Message = ""
    received_at: Timestamp | None = None
    """When Corral received the submission: the ingress stream's timestamp, stamped by the guard and carried
    onward. Latency is measured from it, never from the publisher's `occurred_at` (None: an older guard's)."""


class TaskRejected(Event, frozen=True, kw_only=True, tag="task.rejected"):
    reason: RejectReason
    message: Message
    stage: Literal["guard", "budget"]
    retry_after_s: Seconds | None = None
    policy_version: Version = 0
    remaining_tokens: TokenSum | None = None
    """over_budget: tokens left in the window that refused the task (after its open reservations)."""
    resets_at: Timestamp | None = None
    """over_budget: when that window resets (UTC); None if waiting cannot help (a per-task cap)."""
    received_at: Timestamp | None = None
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
    reserved_tokens: TokenSum
    window: Label
    received_at: Timestamp | None = None
    """When Corral received the submission (see TaskValidated)."""
    high_stakes_tools: Annotated[list[ToolName], msgspec.Meta(max_length=MAX_ITEMS)] = []
    """The guard's TaskValidated.high_stakes_tools, carried on: the executor gates the steps that call them."""


PartStatus = Literal["waiting", "running", "completed", "failed", "cancelled"]


class PartState(msgspec.Struct, frozen=True, kw_only=True):
    """One part of an orchestrated task (a subtask, or the synthesis, id `synthesis`) as its coordinator saw it."""

    id: SubtaskId
    agent: Token
    status: PartStatus
    """waiting (planned, not started), running (started, or claimed on a board), completed, failed, cancelled."""
    tokens: TokenSum = 0
    """What it used, once it answered."""


class TaskProgress(Event, frozen=True, kw_only=True, tag="task.progress"):
    stage: Label
    message: Message
    attempt: Count = 0
    worker: Label = ""
    step_id: MaybeStepId = ""
    """The step it is about, when it is about one."""
    seq: Count = 0
    """Stage `streaming`: the piece's number in its step (1, 2, …), `message` being the answer's next text."""
    parts: Annotated[list[PartState], msgspec.Meta(max_length=MAX_ITEMS + 1)] = []
    """Stage `plan`: every subtask's state and the synthesis's, in the plan's order (the synthesis last)."""

    def dedup_key(self) -> str:
        return f"{self.task_ref}:{self.step_id or self.attempt}:progress.{self.stage}:{self.worker}:{self.seq}"


class TaskCompleted(Event, frozen=True, kw_only=True, tag="task.completed"):
    output: Text
    usage: Usage
    """Tokens of all the task's completed steps (the budget waits for their StepCompleted to add up)."""
    attempts: Count
    """Steps tried, over every strategy, the successful one included."""
    model: ModelName
    strategy: Count = 0
    """Index of the strategy in the fallback chain that produced the output."""
    tier: Label = ""
    dependency: MaybeDependencyKey = ""
    """`provider/model` that answered, or `cache` for a cached answer."""
    received_at: Timestamp | None = None
    """When Corral received the submission (see TaskValidated)."""


class TaskFailed(Event, frozen=True, kw_only=True, tag="task.failed"):
    reason: FailReason
    error: Message
    attempts: Annotated[list[Attempt], msgspec.Meta(max_length=MAX_ITEMS)]
    received_at: Timestamp | None = None
    """When Corral received the submission (see TaskValidated)."""
    usage: Usage | None = None
    """Tokens the task's steps used although it failed (failed attempts, the parts that ran, the planning):
    what the budget waits to have posted before it releases the task. None: none, or an older executor."""


# --- steps: one model call by an agent worker ---------------------------------


class StepEvent(Event, frozen=True, kw_only=True):
    step_id: StepId
    attempt: Count
    agent: Token

    def dedup_key(self) -> str:
        return f"{self.task_ref}:{self.step_id}:{type(self).__struct_config__.tag}"


class StepRequested(StepEvent, frozen=True, kw_only=True, tag="step.requested"):
    provider: Token
    model: ModelName
    prompt: Text
    max_tokens: TokenCount
    messages: Annotated[list[ChatMessage], msgspec.Meta(max_length=MAX_ITEMS + 1)] = []
    """The whole conversation, when the task came as chat messages; `prompt` is its last user turn."""
    strategy: Count = 0
    """Index of the strategy in the agent's fallback chain."""
    tier: Label = ""
    tools: Annotated[list[ToolName], msgspec.Meta(max_length=MAX_ITEMS)] = []
    """Tools the step calls (each a dependency `tool/NAME` with its own breaker)."""
    timeout_s: Seconds = 0.0
    """The worker gives up on the step after this many seconds (0: no limit)."""
    deadline_at: UnixSeconds = 0.0
    """Unix seconds after which the step must not start (the task's deadline or the attempt's); 0: none."""
    subtask: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{0,32}$")] = ""
    """The subtask of an orchestrated task this step runs (empty: the task's own step, or its synthesis)."""
    gated_tools: Annotated[list[ToolName], msgspec.Meta(max_length=MAX_ITEMS)] = []
    """Tools the worker must not call without a person's approval: it stops the step before such a call and
    reports it (StepCompleted.gated)."""
    resume: Resume | None = None
    """Go on from an approved gate: make the approved call, then carry on the conversation it carries."""


class StepCompleted(StepEvent, frozen=True, kw_only=True, tag="step.completed"):
    dependency: DependencyKey
    model: ModelName
    output: Text
    usage: Usage
    latency_ms: Millis
    calls: Annotated[list[Call], msgspec.Meta(max_length=MAX_ITEMS)] | None = None
    """Every dependency the step called (each model call and tool call, in order), for the breakers; None from
    older workers, whose one call was `dependency`."""
    turns: Count = 1
    """Model calls the step made (its agent loop's turns)."""
    refused_tool_calls: Count = 0
    """Tool calls the worker refused (a tool not offered, arguments not valid for its schema) and told the
    model so."""
    first_token_ms: Millis | None = None
    """Milliseconds from the worker taking the step to the first streamed token (None: nothing streamed)."""
    cache: CacheHit | None = None
    """Set when the answer came from the cache (or a coalesced call); `usage` is then what was billed."""
    compaction: PromptCompacted | None = None
    gated: GatedCall | None = None
    """The step stopped before a call that needs approval (not a failure): `output` is empty, `usage` what it
    used up to there; the executor asks for approval and, once given, resumes from the gate."""


class StepFailed(StepEvent, frozen=True, kw_only=True, tag="step.failed"):
    dependency: DependencyKey
    """The dependency that failed (a model `provider/model` or a tool `tool/NAME`)."""
    error: ErrorClass
    message: Message
    retry_after_s: Seconds | None = None
    calls: Annotated[list[Call], msgspec.Meta(max_length=MAX_ITEMS)] | None = None
    """Every dependency the step called, the failed call last, for the breakers (empty: it called none);
    None from older workers, whose one call was `dependency`."""
    latency_ms: Millis = 0.0
    breaker_open: bool = False
    """The worker did not call `dependency`: its circuit was open (error is then `transient`)."""
    model: ModelName = ""
    """The step's model (what its usage is priced at); empty from older workers."""
    usage: Usage | None = None
    """Tokens the step's model calls used before it failed (a fast-tier answer that failed validation, the
    turns of an agent loop before a failed call); the budget bills them once per step id. None: no model
    call answered, or an older worker."""


# --- signals from the breaker -------------------------------------------------

BreakerStateName = Literal["closed", "open", "half_open"]


class BreakerChanged(msgspec.Struct, frozen=True, kw_only=True, tag="breaker.changed", tag_field="kind"):
    """A dependency's circuit moved from one state to another."""

    dependency: DependencyKey
    previous: BreakerStateName
    state: BreakerStateName
    consecutive_failures: BigCount
    occurred_at: Timestamp = msgspec.field(default_factory=utcnow)
    version: Version = CONTRACT_VERSION
    failure_rate: Percent = 0.0
    """Percent of failed calls in the window (or among the half-open probes) when it changed."""
    slow_call_rate: Percent = 0.0
    calls: BigCount = 0
    """Calls the rates were computed over."""
    forced: bool = False
    """An operator forced this state; it holds until released."""
    reason: Message = ""
    generation: BigCount = 0
    """Counts the circuit's transitions; with the dependency it identifies this one."""
    cause_at: UnixSeconds = 0.0
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
    tokens: TokenSum
    """The task's tokens ("task"), or the window's tokens used so far ("threshold")."""
    cost_usd: Usd
    """The task's cost ("task"), or the window's cost so far ("threshold")."""
    remaining_daily_tokens: SignedTokenSum
    remaining_hourly_tokens: SignedTokenSum
    window: BudgetWindow | None = None
    window_start: Label = ""
    """"threshold": the window, e.g. "2026-11-27" (day) or "2026-11-27T13" (hour), UTC."""
    threshold_pct: Annotated[int, msgspec.Meta(ge=0, le=100)] = 0

    def dedup_key(self) -> str:
        if self.reason == "threshold":  # one notice per threshold per window, whichever task crossed it
            return f"cost:{self.tenant}:{self.user}:{self.window}:{self.window_start}:{self.threshold_pct}"
        return f"{self.task_ref}:cost.notice"


# --- what the dead-letter stream stores --------------------------------------


DEAD_LETTER_PAYLOAD_BYTES = 4096
"""How much of a dead message its letter keeps: enough to see what it was, and a letter of any message fits in
one (the whole payload of a message near the server's maximum would not, base64-encoded)."""
DEAD_LETTER_SUBJECT_CHARS = 1024
DEAD_LETTER_REASON_CHARS = 2048


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True, tag="dead.letter", tag_field="kind"):
    """A message a service could not process, kept with the reason: its first bytes, its size and its hash."""

    service: Label
    subject: Annotated[str, msgspec.Meta(max_length=DEAD_LETTER_SUBJECT_CHARS)]
    reason: Annotated[str, msgspec.Meta(max_length=DEAD_LETTER_REASON_CHARS)]
    payload: Annotated[bytes, msgspec.Meta(max_length=DEAD_LETTER_PAYLOAD_BYTES)]
    """The message's first DEAD_LETTER_PAYLOAD_BYTES bytes (all of it, when it is shorter)."""
    deliveries: Count = 1
    occurred_at: Timestamp = msgspec.field(default_factory=utcnow)
    version: Version = CONTRACT_VERSION
    payload_size: Annotated[int, msgspec.Meta(ge=0, le=1 << 40)] = 0
    """Bytes of the whole message."""
    payload_sha256: Annotated[str, msgspec.Meta(pattern=r"^([0-9a-f]{64})?$")] = ""
    """Hex SHA-256 of the whole message, to find it (or its copies) in the stream it came from."""

    @classmethod
    def of(cls, service: str, subject: str, reason: str, data: bytes, deliveries: int,
           keep_bytes: int = DEAD_LETTER_PAYLOAD_BYTES) -> DeadLetter:
        """The letter of a message: its reason, subject and first `keep_bytes` bytes, each bounded, with the
        whole payload's size and hash. Its size does not depend on the message's."""
        return cls(service=service, subject=clip(subject, DEAD_LETTER_SUBJECT_CHARS),
                   reason=clip(reason, DEAD_LETTER_REASON_CHARS), payload=data[:keep_bytes], deliveries=deliveries,
                   payload_size=len(data), payload_sha256=hashlib.sha256(data).hexdigest())


# --- what the monitor says ----------------------------------------------------------------------------------

AlertSeverity = Literal["info", "medium", "high", "critical"]
Figure = Annotated[float, msgspec.Meta(ge=-1e18, le=1e18)]


class AlertEvent(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind"):
    """What a firing and its resolution both say: the rule, where, and the figure against its threshold."""

    rule: Label
    severity: AlertSeverity
    scope: Label
    """`all`, `tenant:NAME`, `agent:NAME`, `model:NAME`, `dependency:KEY` or `consumer:DURABLE`."""
    figure: Label
    value: Figure
    threshold: Figure
    """The rule's threshold (a firing) or resolve threshold (a resolution)."""
    started_at: Timestamp = msgspec.field(default_factory=utcnow)
    """When it began firing: the same on its AlertResolved."""
    occurred_at: Timestamp = msgspec.field(default_factory=utcnow)
    version: Version = CONTRACT_VERSION

    def dedup_key(self) -> str:
        return f"{type(self).__struct_config__.tag}:{self.rule}:{self.scope}:{self.started_at.timestamp():.6f}"


class Alert(AlertEvent, frozen=True, kw_only=True, tag="alert.firing"):
    """A rule's figure crossed its threshold in one scope (and stayed there for the rule's `for`)."""

    window: Label = ""
    policy_version: Version = 0
    """The policy that was current when it fired."""
    message: Message = ""


class AlertResolved(AlertEvent, frozen=True, kw_only=True, tag="alert.resolved"):
    """A firing alert's figure went back to (or below) its rule's resolve threshold."""


class PolicyRolledBack(msgspec.Struct, frozen=True, kw_only=True, tag="policy.rolled_back", tag_field="kind"):
    """The monitor made the previous policy current again: a critical alert began firing soon after a change."""

    from_version: Version
    """The version the alert followed (replaced)."""
    to_version: Version
    """The new version, a copy of the one before `from_version`."""
    restored_version: Version
    alert: Alert
    occurred_at: Timestamp = msgspec.field(default_factory=utcnow)
    version: Version = CONTRACT_VERSION

    def dedup_key(self) -> str:
        return f"rollback:{self.from_version}"


MONITOR_EVENTS = (Alert, AlertResolved, PolicyRolledBack)

TASK_EVENTS = (TaskSubmitted, TaskValidated, TaskRejected, TaskAdmitted, TaskProgress, TaskCompleted, TaskFailed)
STEP_EVENTS = (StepRequested, StepCompleted, StepFailed)
ALL_CONTRACTS = (*TASK_EVENTS, *STEP_EVENTS, CostNotice, BreakerChanged, DeadLetter, *MONITOR_EVENTS)


# --- what the monitor advises the stack's scalers ---------------------------------

Rate = Annotated[float, msgspec.Meta(ge=0.0, le=1e9)]
"""Messages per second."""


class ScaleAdvice(msgspec.Struct, frozen=True, kw_only=True, tag="scale.advice", tag_field="kind"):
    """How many replicas a service should run now, from its consumers' backlog and processing rate
    (services/monitor/scaling.py). Advice, not a command: `corral up --autoscale` acts on it locally; on
    Kubernetes KEDA computes the same from the same consumers."""

    service: Token
    """The service as `corral service` names it: `executor`, `worker-research`, …"""
    replicas: Count
    """Desired replicas, within [minimum, maximum]; lowered only after the policy's scale-down delay."""
    minimum: Count
    maximum: Count
    lag: BigCount
    """Pending plus unacknowledged messages over the service's durable consumers."""
    processing_rate: Rate = 0.0
    """Messages its consumers acknowledged per second since the monitor last looked."""
    reason: Message = ""
    occurred_at: Timestamp = msgspec.field(default_factory=utcnow)
    version: Version = CONTRACT_VERSION

    def dedup_key(self) -> str:
        return f"{self.service}:{self.occurred_at.timestamp():.6f}"


ALL_CONTRACTS = (*ALL_CONTRACTS, ScaleAdvice)


# The approvals' value types that steps carry (contracts/approvals.py builds on the types above, hence last).
from contracts.approvals import GatedCall, Resume  # noqa: E402
