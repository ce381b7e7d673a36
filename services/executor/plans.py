"""Orchestrated tasks, coordinated by the executor (`centralized`): which subtasks may start, what each one's
agent is told, and what the synthesis reads. Pure functions of a task's record; the executor decides, records
and publishes as for any step."""

from __future__ import annotations

from contracts import Usage
from contracts.boards import SYNTHESIS_ID
from contracts.events import PartState, Plan
from services.executor.state import SubtaskState, TaskRecord
from shared import plans as shared_plans

ENDED = ("completed", "failed", "cancelled")


def plan_of(record: TaskRecord) -> Plan:
    """The publisher's plan, or the manager's."""
    plan = record.task.spec.plan or record.plan
    assert plan is not None
    return plan


def ready(record: TaskRecord, max_parallel: int) -> list[SubtaskState]:
    """Waiting subtasks whose needs have ended well (or ended at all, under best_effort), as many as may start
    beside those running."""
    by_id = {sub.spec.id: sub for sub in record.subtasks}
    best_effort = plan_of(record).on_failure == "best_effort"
    room = max_parallel - sum(sub.status == "running" for sub in record.subtasks)
    found = []
    for sub in record.subtasks:
        needs = [by_id[n].status for n in sub.spec.needs]
        if sub.status == "waiting" and all(s == "completed" or (best_effort and s in ENDED) for s in needs):
            found.append(sub)
    return found[:max(0, room)]


def settled(record: TaskRecord) -> bool:
    """Every subtask has ended, or can never start (a need of it failed)."""
    return not any(sub.status == "running" for sub in record.subtasks) and not ready(record, len(record.subtasks))


def subtask_prompt(record: TaskRecord, sub: SubtaskState) -> str:
    return shared_plans.subtask_prompt(record.task.spec.prompt, sub, {s.spec.id: s for s in record.subtasks})


def synthesis_prompt(record: TaskRecord) -> str:
    return shared_plans.synthesis_prompt(record.task.spec.prompt, record.subtasks)


def total_usage(record: TaskRecord, last: Usage) -> Usage:
    """The synthesis's usage with every subtask's and the planning's."""
    return Usage.sum([*(sub.usage for sub in record.subtasks), record.planning_usage, last])


def failed_usage(record: TaskRecord) -> list[Usage | None]:
    """What the failed steps of the task and of its subtasks used (each attempt's StepFailed usage): the budget
    bills those steps too, so the task's end reports them."""
    return [a.usage for cursor in (record, *record.subtasks) for a in cursor.attempts]


def spent_by_failed(record: TaskRecord) -> Usage | None:
    """A failed task's usage: the planning's, each ended part's and every failed step's (None: nothing)."""
    usage = Usage.sum([record.planning_usage, *(sub.usage for sub in record.subtasks), *failed_usage(record)])
    return usage if usage.total or usage.cached_tokens else None


def free_slots(record: TaskRecord) -> list[SubtaskState]:
    """The subtasks that hold a tenant slot and have ended (all of them, once the task has): marked as holding
    none, for the decision's record; the caller gives their slots back once it is written."""
    freed = [sub for sub in record.subtasks if sub.slot and (sub.status in ENDED or record.status != "running")]
    for sub in freed:
        sub.slot = False
    return freed


def reserved(record: TaskRecord) -> int:
    """What the task holds: its reservation at admission and what its parts added since."""
    return record.task.reserved_tokens + sum(record.extensions.values())


def committed(record: TaskRecord) -> int:
    """Tokens the task has used or may use now: the planning's, each ended part's and each failed step's usage,
    and the estimate of each part running."""
    used = record.planning_usage.total if record.planning_usage else 0
    used += sum(usage.total for usage in failed_usage(record) if usage is not None)
    for sub in record.subtasks:
        used += sub.usage.total if sub.usage else sub.estimate if sub.status == "running" else 0
    return used


def board(record: TaskRecord) -> str:
    """One line of the plan's state: each subtask's id and status, then the synthesis's."""
    states = ", ".join(f"{sub.spec.id} {sub.status}" for sub in record.subtasks)
    synthesis = {"subtasks": "waiting", "synthesis": "running", "planning": "waiting"}.get(record.phase, record.status)
    return f"subtasks: {states}; synthesis {synthesis if record.status == 'running' else record.status}"


def parts(record: TaskRecord) -> list[PartState]:
    """Every subtask's state and the synthesis's, for progress."""
    states = [PartState(id=sub.spec.id, agent=sub.spec.agent, status=sub.status,
                        tokens=sub.usage.total if sub.usage else 0) for sub in record.subtasks]
    synthesis = {"subtasks": "waiting", "synthesis": "running", "planning": "waiting"}.get(record.phase, "waiting")
    if record.status != "running":
        synthesis = "completed" if record.status == "completed" else "cancelled" if record.phase != "synthesis" \
            else "failed"
    plan = record.task.spec.plan or record.plan
    agent = (plan.synthesis if plan else None) or record.task.spec.agent
    return [*states, PartState(id=SYNTHESIS_ID, agent=agent, status=synthesis)]
