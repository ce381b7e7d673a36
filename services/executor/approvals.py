"""The executor's side of human approvals: mark a step waiting at its gate, ask, and resume or fail on the decision.

- A step that stopped at a gate (StepCompleted.gated) leaves its cursor (the task's own step or a subtask)
  waiting: the record keeps the gated call and the conversation to it, the sweep leaves it alone (no step
  deadline), and ApprovalRequested goes out: decide, record, publish, as every executor decision.
- ApprovalDecided approved or edited: the gated step alone is asked for again, as a new step carrying the
  conversation and the approved call (`resume`), so nothing before the gate runs again. The time waited is
  added to the task's deadline. Denied or timed out: the task (or, in a plan, the subtask) fails with the
  reviewer's reason; or, a denied call under the policy's `on_deny = "continue"`, the step resumes without it
  (the model is told it was refused, and why). Escalated: nothing changes here; the task keeps waiting.
- Exactly once: the decision is taken on the record by compare-and-set. A second delivery of the decision, or a
  second decision event, finds the cursor no longer waiting for that approval and does nothing (it publishes
  the resumed step again only when it is the very event that decided, within the stream's duplicate window,
  where the repeat is dropped). The approvals service lets one decision per approval through.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from contracts import StepCompleted, StepRequested, TaskProgress, Usage, subjects
from contracts.approvals import ApprovalDecided, ApprovalRequested, Resume, Rule, ToolCallSpec, approval_id
from contracts.events import clip
from contracts.policy import Policy
from services.executor.state import ApprovalWait, Gates, SubtaskState, TaskRecord

if TYPE_CHECKING:
    from services.executor.handlers import Executor

Cursor = TaskRecord | SubtaskState
RESUMED = "=r"
"""What a resumed step's id adds to the id of the step that stopped: `<step>=r<n>`, n the approvals so far."""


def with_gates(cursor: Cursor, usage: Usage) -> Usage:
    """A step's usage plus what the steps before it that stopped at gates used."""
    return Usage.sum([cursor.gates.usage, usage]) if cursor.gates is not None and cursor.gates.usage else usage


def gated_request(record: TaskRecord, cursor: Cursor, request: StepRequested) -> StepRequested:
    """The step as the worker gets it: the task's high-stakes tools gated, and the resume it carries, if any."""
    gated = [tool for tool in request.tools if tool in record.task.high_stakes_tools]
    gates = cursor.gates
    # only the resumed step carries the resume: a retry after it starts again, and meets the gate again
    resume = gates.resume if gates is not None and gates.resume_step == cursor.step_id else None
    if not gated and resume is None:
        return request
    return msgspec.structs.replace(request, gated_tools=gated, resume=resume)


def hold_before(executor: Executor, record: TaskRecord, cursor: Cursor, agent: str) -> None:
    """A step just scheduled that a rule says a person approves first waits (before it is published)."""
    rule = _step_rule(executor.policy(), record, cursor, agent)
    if rule is None:
        return
    gates = cursor.gates or Gates()
    # its own id: a call of the same step may wait for another approval later
    gates.waiting = ApprovalWait(approval_id=approval_id(f"{cursor.step_id}=start"), gated=None, step_id=cursor.step_id,
                                 since=executor.clock(), rule=rule[0], why=rule[1])
    cursor.gates, cursor.step_deadline = gates, 0.0  # no deadline: the sweep leaves a waiting step alone


def _step_rule(policy: Policy, record: TaskRecord, cursor: Cursor, agent: str) -> tuple[Rule, str] | None:
    """Which rule makes this step wait for a person before it starts, and why; None: none does."""
    if cursor.gates is not None and cursor.gates.step_approved:
        return None
    rules = policy.approvals_for(record.task.tenant)
    if isinstance(cursor, SubtaskState) and cursor.spec.requires_approval:
        return "requires_approval", f"the plan's subtask {cursor.spec.id!r} requires approval"
    rule = rules.step_rule(agent, record.task.estimate.total)
    if rule is not None:
        return rule
    if rules.cost_above_usd is not None and not (record.gates is not None and record.gates.cost_approved):
        cost = cost_so_far(policy, record)[1]
        if cost > rules.cost_above_usd:
            return "cost_above", f"the task's cost so far of ${cost:.6f} is above ${rules.cost_above_usd:g}"
    return None


def cost_so_far(policy: Policy, record: TaskRecord) -> tuple[Usage, float]:
    """The task's usage as its record knows it, and its price: each part (the record's own steps, each subtask)
    priced at the model of its current strategy (a hybrid board's part, whose model the record does not know:
    its agent's first). A part that answered counts its usage (the steps it stopped at gates included); one
    still under way, the steps it stopped at gates; failed attempts are not known."""
    usages, cost = [], 0.0
    for part in (record, *record.subtasks):
        used = Usage.sum([part.usage if part.usage is not None else part.gates.usage if part.gates else None,
                          record.planning_usage if part is record else None])
        chain = part.chain or (policy.agents[part.spec.agent].chain if isinstance(part, SubtaskState)
                               and part.spec.agent in policy.agents else [])
        model = chain[part.strategy].model if part.strategy < len(chain) else ""
        usages.append(used)
        cost += policy.price_of(model).cost(used)
    return Usage.sum(usages), cost


def waits_to_start(cursor: Cursor) -> bool:
    return cursor.gates is not None and cursor.gates.waiting is not None and cursor.gates.waiting.gated is None


async def ask_to_start(executor: Executor, record: TaskRecord, cursor: Cursor, agent: str) -> None:
    """Publish the request for a step that waits before it starts (again, on a republish: dropped)."""
    wait, task = cursor.gates.waiting, record.task
    what = cursor.spec.instruction if isinstance(cursor, SubtaskState) else task.spec.prompt
    await _publish_request(executor, record, cursor, wait, agent=agent, step_input=clip(what, 2048))


def waiting_ids(record: TaskRecord) -> list[str]:
    """The approvals the task waits for (`corral status`)."""
    return [cursor.gates.waiting.approval_id for cursor in (record, *record.subtasks)
            if cursor.gates is not None and cursor.gates.waiting is not None]


async def gate(executor: Executor, record: TaskRecord, revision: int, cursor: Cursor, step: StepCompleted) -> None:
    """The step stopped before a gated call: wait for a person."""
    gates = cursor.gates or Gates()
    if gates.waiting is not None and gates.waiting.step_id == step.step_id:  # a redelivery: ask again (dropped)
        await _ask(executor, record, cursor, gates.waiting, step)
        return
    wait = ApprovalWait(approval_id=approval_id(step.step_id), gated=step.gated, step_id=step.step_id,
                        since=executor.clock())
    gates.waiting, gates.usage = wait, Usage.sum([gates.usage, step.usage])
    cursor.gates, cursor.step_deadline = gates, 0.0  # no deadline: the sweep leaves a waiting step alone
    await executor._record(record, revision, step.step_id)
    await _ask(executor, record, cursor, wait, step)


async def _ask(executor: Executor, record: TaskRecord, cursor: Cursor, wait: ApprovalWait,
               step: StepCompleted) -> None:
    await _publish_request(executor, record, cursor, wait, agent=step.agent)


async def _publish_request(executor: Executor, record: TaskRecord, cursor: Cursor, wait: ApprovalWait, *,
                           agent: str, step_input: str = "") -> None:
    task, gated = record.task, wait.gated
    so_far, cost = cost_so_far(executor.policy(), record)
    what = f"{gated.call.name} {gated.call.arguments}" if gated else f"the step: {step_input}"
    await executor.emit(subjects.task_progress(task.tenant, task.task_id), TaskProgress(
        task_id=task.task_id, tenant=task.tenant, user=task.user, stage="waiting_approval", step_id=wait.step_id,
        message=clip(f"waiting for approval {wait.approval_id}: {what}")))
    call = dict(tool=gated.call.name, arguments=gated.call.arguments, rule=gated.rule, why=gated.why,
                requested_by=gated.worker) if gated else dict(rule=wait.rule, why=wait.why, step_input=step_input,
                                                              requested_by="executor")
    await executor.emit(subjects.approval_requested(task.tenant), ApprovalRequested(
        task_id=task.task_id, tenant=task.tenant, user=task.user, approval_id=wait.approval_id,
        step_id=wait.step_id, agent=agent, subtask=cursor.spec.id if isinstance(cursor, SubtaskState) else "",
        usage_so_far=so_far, cost_so_far_usd=cost, estimate_tokens=task.estimate.total, **call))


def _waiting_for(record: TaskRecord, approval: str) -> Cursor | None:
    return next((cursor for cursor in (record, *record.subtasks) if cursor.gates is not None
                 and cursor.gates.waiting is not None and cursor.gates.waiting.approval_id == approval), None)


async def decided(executor: Executor, event: ApprovalDecided, fresh: bool) -> None:
    from services.executor.handlers import _Stale

    record, revision = await executor.tasks.read(event.task_ref, cached=not fresh)
    cursor = _waiting_for(record, event.approval_id) if record is not None and record.status == "running" else None
    if cursor is None:
        if not fresh:
            raise _Stale
        if record is not None:
            await executor._republish(record, event.approval_id)  # the event that decided, redelivered
        return
    if event.outcome == "escalated":
        return
    if event.outcome in ("approved", "edited"):
        await _resume(executor, record, revision, cursor, event)
        return
    words = (f"approval {event.approval_id} was denied by {event.reviewer}: {event.reason}"
             if event.outcome == "denied" else f"approval {event.approval_id} timed out: {event.reason}")
    if event.outcome == "denied" and cursor.gates.waiting.gated is not None and \
            executor.policy().approvals_for(record.task.tenant).on_deny == "continue":
        await _resume(executor, record, revision, cursor, event, refused=clip(words))  # on, without the call
        return
    cursor.gates.waiting = None
    if isinstance(cursor, SubtaskState):
        await executor._subtask_failed(record, revision, event.approval_id, cursor, "permanent_error", words)
    else:
        await executor._end_failed(record, revision, event.approval_id, "permanent_error", words)


async def _resume(executor: Executor, record: TaskRecord, revision: int, cursor: Cursor,
                  event: ApprovalDecided, refused: str = "") -> None:
    """Go on from the gate: with the approved call, or (`refused`: the reviewer's denial) without it."""
    gates, now = cursor.gates, executor.clock()
    wait = gates.waiting
    record.deadline_at += now - wait.since  # the wait does not count against the task's deadline
    strategy = cursor.chain[cursor.strategy]
    if wait.gated is None:  # the step waited to start: it starts now, as scheduled
        gates.waiting, gates.step_approved = None, True
        if wait.rule == "cost_above":  # the task's cost so far was approved: no later step asks on it again
            record.gates = record.gates or Gates()
            record.gates.cost_approved = True
        gates.approved = [*gates.approved, event.approval_id]
        cursor.not_before, cursor.step_deadline = now, now + min(strategy.timeout_s, record.deadline_at - now)
        await executor._record(record, revision, event.approval_id)
        await executor._publish_step(record, cursor)
        return
    call = wait.gated.call
    if refused:
        gates.refused, approved = [*gates.refused, event.approval_id], call
    else:
        approved = ToolCallSpec(id=call.id, name=call.name, arguments=event.arguments or call.arguments)
        gates.approved = [*gates.approved, event.approval_id]
    gates.resume = Resume(approval_id=event.approval_id, call=approved, turns=wait.gated.turns,
                          after=wait.gated.after, approved=gates.approved, refused=refused)
    gates.waiting = None
    resumes = len(gates.approved) + len(gates.refused)
    cursor.step_id = gates.resume_step = f"{wait.step_id.split(RESUMED)[0]}{RESUMED}{resumes}"
    cursor.not_before = now
    cursor.step_deadline = now + min(strategy.timeout_s, record.deadline_at - now)
    await executor._record(record, revision, event.approval_id)
    await executor._publish_step(record, cursor)
