"""Human approvals: what a gated step asks for, what reviewers decide, and the record the approvals service keeps.

A step that would call a high-stakes tool stops before the call. Its worker reports the step completed with
the call it held back (`GatedCall`: the tool and arguments, the conversation so far, which rule); the executor
marks the task waiting and publishes ApprovalRequested; the approvals service keeps one `Approval` per request
(KV `corral_approvals`, key `<tenant>.<approval id>`, changed by compare-and-set) and publishes every decision
as ApprovalDecided; the executor resumes the gated step (only it) with the approved or edited arguments.

Events here derive from `events.Event` (who, which task, when); commands and replies travel by request/reply.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Literal

import msgspec

from contracts.events import (
    CONTRACT_VERSION,
    MAX_ITEMS,
    Count,
    Event,
    Label,
    Message,
    StepId,
    TaskId,
    Text,
    Token,
    TokenSum,
    ToolName,
    UnixSeconds,
    Usage,
    Usd,
    Version,
)

ApprovalId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
"""32 hex digits of the gated step's id's hash: the same step always asks under the same id."""
Arguments = Annotated[str, msgspec.Meta(max_length=65_536)]
"""A tool call's arguments, as the JSON object text the model wrote (or the reviewer edited)."""
CallId = Annotated[str, msgspec.Meta(max_length=256)]
Rule = Literal["high_stakes_tool", "requires_approval", "cost_above", "agent_kind"]
"""Why a step needs approval: its tool is in the tenant's high-stakes set; its plan subtask says so; the task's
estimate or cost so far is above the policy's amount; its agent kind is always reviewed."""
Outcome = Literal["approved", "denied", "edited", "timed_out", "escalated"]
"""`edited`: approved with other arguments. `escalated`: not an end: another group has a new deadline."""
ApprovalStatus = Literal["pending", "approved", "denied", "timed_out"]
Decision = Literal["approve", "deny", "edit"]
ENDS: dict[Outcome, ApprovalStatus] = {"approved": "approved", "edited": "approved", "denied": "denied",
                                       "timed_out": "timed_out"}


class ToolCallSpec(msgspec.Struct, frozen=True, kw_only=True):
    """One tool call a model asked for."""

    id: CallId
    name: ToolName
    arguments: Arguments = "{}"


class AgentTurn(msgspec.Struct, frozen=True, kw_only=True):
    """One turn of an agent loop's conversation, tool calls and results included: carried across a gate so the
    resumed step goes on from there and the model does not make its earlier calls again."""

    role: Literal["system", "user", "assistant", "tool"]
    content: Text = ""
    name: Annotated[str, msgspec.Meta(max_length=256)] = ""
    tool_call_id: CallId = ""
    tool_calls: Annotated[list[ToolCallSpec], msgspec.Meta(max_length=MAX_ITEMS)] = []
    is_error: bool = False


class GatedCall(msgspec.Struct, frozen=True, kw_only=True):
    """What a step held back for approval: the call it would make, and where its agent loop stood."""

    call: ToolCallSpec
    """The gated call: what exactly would run."""
    rule: Rule = "high_stakes_tool"
    why: Message = ""
    turns: Annotated[list[AgentTurn], msgspec.Meta(max_length=4 * MAX_ITEMS)] = []
    """The conversation up to the gate: the model's turn asking for the call, and the results of the calls
    made before it."""
    after: Annotated[list[ToolCallSpec], msgspec.Meta(max_length=MAX_ITEMS)] = []
    """Calls the same model turn asked for after the gated one: made (and gated again if need be) on resume."""
    worker: Label = ""
    """The worker replica that stopped (host-pid)."""


class Resume(msgspec.Struct, frozen=True, kw_only=True):
    """On a StepRequested: go on from a gate. The worker makes the approved call with `arguments` first (not
    asking the model), then the calls after it, then the loop goes on from `turns`."""

    approval_id: ApprovalId
    call: ToolCallSpec
    """The call as approved: its arguments the reviewer's, when edited."""
    turns: Annotated[list[AgentTurn], msgspec.Meta(max_length=4 * MAX_ITEMS)] = []
    after: Annotated[list[ToolCallSpec], msgspec.Meta(max_length=MAX_ITEMS)] = []
    approved: Annotated[list[ApprovalId], msgspec.Meta(max_length=MAX_ITEMS)] = []
    """Every approval this step's task has had: informational, for the tool's idempotency (the approval id)."""
    refused: Message = ""
    """Not empty: the call was denied (the policy's `on_deny = "continue"`): it is not made, its result to the
    model is this refusal (the reviewer's reason), and the loop goes on with the calls after it."""


# --- events --------------------------------------------------------------------------------------------------


class ApprovalRequested(Event, frozen=True, kw_only=True, tag="approval.requested"):
    """A step of this task waits for a person: what would run, why, what it cost so far, who asked."""

    approval_id: ApprovalId
    step_id: StepId
    agent: Token
    subtask: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_=-]{0,32}$")] = ""
    tool: ToolName | None = None
    """The tool call that would run; None: the whole step waits, before it starts (`step_input`)."""
    arguments: Arguments = "{}"
    rule: Rule = "high_stakes_tool"
    step_input: Message = ""
    """A step that waits before it starts: what its agent would be asked (its start)."""
    why: Message = ""
    usage_so_far: Usage = Usage(input_tokens=0, output_tokens=0)
    cost_so_far_usd: Usd = 0.0
    estimate_tokens: TokenSum = 0
    requested_by: Label = ""
    """The worker replica (or `executor`) that stopped the step."""

    def dedup_key(self) -> str:
        return f"{self.task_ref}:approval.requested:{self.approval_id}"


class ApprovalDecided(Event, frozen=True, kw_only=True, tag="approval.decided"):
    """A decision on an approval: by a reviewer (approved, edited, denied), or by the deadline (timed_out, or
    escalated to another group with a new deadline)."""

    approval_id: ApprovalId
    outcome: Outcome
    reviewer: Label = ""
    """Who decided (empty: the deadline)."""
    reason: Message = ""
    arguments: Arguments = "{}"
    """The arguments approved: the requested ones, or the reviewer's (edited)."""
    group: Label = ""
    """The reviewer group that decided, or (escalated) the group that decides now."""
    deadline_at: UnixSeconds = 0.0
    """escalated: the new deadline."""
    seq: Count = 0
    """The decision's number in its approval's history (escalations come before the end)."""

    def dedup_key(self) -> str:
        return f"{self.task_ref}:approval.decided:{self.approval_id}:{self.seq}"


class ApprovalReminder(Event, frozen=True, kw_only=True, tag="approval.reminder"):
    """An approval is still pending: a nudge to its reviewer group before the deadline."""

    approval_id: ApprovalId
    group: Label
    deadline_at: UnixSeconds
    seq: Count = 0

    def dedup_key(self) -> str:
        return f"{self.task_ref}:approval.reminder:{self.approval_id}:{self.seq}"


ApprovalEvent = ApprovalRequested | ApprovalDecided | ApprovalReminder


# --- the record ---------------------------------------------------------------------------------------------


class Approval(msgspec.Struct, kw_only=True):
    """One approval, as the approvals service keeps it: the request, where it stands, and its history."""

    request: ApprovalRequested
    status: ApprovalStatus = "pending"
    opened_at: UnixSeconds = 0.0
    group: Label = ""
    """The reviewer group that may decide now."""
    deadline_at: UnixSeconds = 0.0
    escalations: Count = 0
    reminders: Count = 0
    decided_by: Label = ""
    decided_at: UnixSeconds = 0.0
    reason: Message = ""
    arguments: Arguments = ""
    """The arguments approved (the request's or the reviewer's)."""
    history: Annotated[list[ApprovalDecided], msgspec.Meta(max_length=MAX_ITEMS)] = []
    announced: Count = 0
    """Decisions of `history` published so far: fewer from a decision's write until its ApprovalDecided is out;
    a replica that finds it so (its decider died in between) publishes the rest."""

    @property
    def unannounced(self) -> list[ApprovalDecided]:
        return self.history[self.announced:]


class ApprovedCall(msgspec.Struct, kw_only=True):
    """The workers' note of an approved call (`corral_approved_calls`, key `<tenant>.<approval id>`): made before
    the call, completed with its result after it. A worker that finds a note does not make the call again: it
    reuses the result, or, when the note has none (the worker that made it stopped during the call), tells the
    model the outcome is unknown. So the approved side effect happens at most once, whatever crashes."""

    worker: Label
    started_at: UnixSeconds
    result: AgentTurn | None = None


# --- commands and replies (request/reply on the approvals service) --------------------------------------------


class Command(msgspec.Struct, frozen=True, kw_only=True):
    version: Version = CONTRACT_VERSION


class DecideApproval(Command, frozen=True, kw_only=True, tag="approval.decide", tag_field="kind"):
    """A reviewer's decision. Who the reviewer is comes from the subject it was sent on
    (`corral.approvals.decide.<reviewer>`, which only that reviewer's identity may publish), never from here."""

    tenant: Token = "default"
    approval_id: ApprovalId
    decision: Decision
    reason: Message = ""
    arguments: Arguments | None = None
    """edit: the tool's arguments to run instead (a JSON object)."""


class ListApprovals(Command, frozen=True, kw_only=True, tag="approval.list", tag_field="kind"):
    tenant: Token | None = None
    """None: every tenant's."""
    status: ApprovalStatus | None = "pending"
    """None: whatever their status."""
    limit: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 100


class ShowApproval(Command, frozen=True, kw_only=True, tag="approval.show", tag_field="kind"):
    tenant: Token = "default"
    approval_id: ApprovalId


class ApprovalHistory(Command, frozen=True, kw_only=True, tag="approval.history", tag_field="kind"):
    """Every request, decision, reminder and escalation, oldest first (of one tenant, or one task)."""

    tenant: Token | None = None
    task_id: TaskId | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 200


class ApprovalReply(msgspec.Struct, frozen=True, kw_only=True):
    """The approval after the command (or as it stands), and whether the command did what it asked."""

    ok: bool
    message: Message = ""
    approval: Approval | None = None


class ApprovalList(msgspec.Struct, frozen=True, kw_only=True):
    approvals: Annotated[list[Approval], msgspec.Meta(max_length=1000)] = []


class ApprovalEvents(msgspec.Struct, frozen=True, kw_only=True):
    events: Annotated[list[ApprovalRequested | ApprovalDecided | ApprovalReminder],
                      msgspec.Meta(max_length=10_000)] = []


def approval_id(step_id: str) -> str:
    """The id of the approval a step asks for: derived from the step, so a redelivered gate asks the same."""
    return hashlib.sha256(step_id.encode()).hexdigest()[:32]


def approval_key(tenant: str, approval: str) -> str:
    return f"{tenant}.{approval}"


APPROVAL_CONTRACTS = (ApprovalRequested, ApprovalDecided, ApprovalReminder, DecideApproval, ListApprovals,
                      ShowApproval, ApprovalHistory, ApprovalReply, ApprovalList, ApprovalEvents)
