"""The executor's record of each task, in the `corral_tasks` bucket it alone writes, and its cache entries."""

from __future__ import annotations

import hashlib
from typing import Literal

import msgspec

from contracts import Attempt, TaskAdmitted, TaskCompleted, TaskFailed, TaskSpec, TokenEstimate, Usage
from contracts.approvals import GatedCall, Resume
from contracts.events import Plan, StepEvent, Subtask
from contracts.policy import Strategy

TaskStatus = Literal["running", "completed", "failed"]
SubtaskStatus = Literal["waiting", "running", "completed", "failed", "cancelled"]
Phase = Literal["single", "planning", "subtasks", "board", "synthesis"]
PLANNING, SYNTHESIS = "=plan", "=synthesis"
"""The step ids' part for a task's planning and synthesis steps: `=` is in no subtask id."""


class ApprovalWait(msgspec.Struct, kw_only=True):
    """A step stopped at a gate (services/executor/approvals.py): which approval it waits for, and what to resume."""

    approval_id: str
    gated: GatedCall | None
    """The call held back; None: the step waits before it starts (a rule of the policy or the plan)."""
    step_id: str
    """The step that stopped (or waits to start)."""
    since: float
    rule: str = "high_stakes_tool"
    why: str = ""
    deadline_extended: bool = False


class Gates(msgspec.Struct, kw_only=True):
    """A step cursor's approvals: the one it waits for, the resume its current step carries, what the steps
    that stopped at gates used."""

    waiting: ApprovalWait | None = None
    resume: Resume | None = None
    resume_step: str = ""
    """The step that carries `resume` (a later retry of it does not)."""
    usage: Usage | None = None
    approved: list[str] = []
    """Approvals given so far, in order."""
    step_approved: bool = False
    """The cursor's step-level approval was given: its later attempts do not wait again."""
    refused: list[str] = []
    """Approvals denied whose call the step went on without (`on_deny = "continue"`), in order."""
    cost_approved: bool = False
    """On the record's gates: a person approved going on with the task's cost so far (`cost_above_usd` does not
    ask again)."""


class SubtaskState(msgspec.Struct, kw_only=True):
    """One subtask of an orchestrated task: where it is in its agent's fallback chain (the same fields as a
    TaskRecord's own step: the executor walks both chains alike) and what it answered."""

    spec: Subtask
    status: SubtaskStatus = "waiting"
    chain: list[Strategy] = []
    strategy: int = 0
    attempt: int = 1
    step_id: str = ""
    steps: int = 0
    not_before: float = 0.0
    step_deadline: float = 0.0
    attempts: list[Attempt] = []
    output: str = ""
    usage: Usage | None = None
    error: str = ""
    """Why it failed (its last attempt's error)."""
    slot: bool = False
    """It holds one of its tenant's slots for running subtasks (shared.slots), given back once it ends."""
    estimate: int = 0
    """Tokens it was expected to use when it started (its prompt and its output cap), until its usage is known."""
    gates: Gates | None = None


class TaskRecord(msgspec.Struct, kw_only=True):
    task: TaskAdmitted
    """The admitted task, kept to issue its next step."""
    status: TaskStatus = "running"
    chain: list[Strategy] = []
    """The agent's fallback chain as it was at admission: a policy change never shifts a running task."""
    strategy: int = 0
    """Index in `chain` of the current step's strategy."""
    attempt: int = 1
    """Attempt number of the current step on its strategy."""
    step_id: str = ""
    steps: int = 0
    """Steps asked for so far, over every strategy."""
    not_before: float = 0.0
    """Unix seconds before which the current step is not published (backoff, retry-after)."""
    step_deadline: float = 0.0
    """Unix seconds by which the current step's outcome is due (the sweep acts after a grace)."""
    deadline_at: float = 0.0
    """Unix seconds by which the whole task must end."""
    decided_by: str = ""
    """Id of the event (task id or step id) whose handling made the current decision."""
    decided_at: float = 0.0
    attempts: list[Attempt] = []
    """Failed attempts and skipped strategies, in order."""
    usage: Usage | None = None
    outcome: TaskCompleted | TaskFailed | None = None
    """The terminal event once decided, kept so a redelivery publishes the very same one."""
    admitted_at: float = 0.0
    phase: Phase = "single"
    """An orchestrated task has its manager plan (unless the publisher sent a plan), runs its `subtasks`, then
    its synthesis: the planning and the synthesis as the record's own steps."""
    subtasks: list[SubtaskState] = []
    plan: Plan | None = None
    """The manager's plan, once it made a valid one."""
    plan_mistake: str = ""
    """Why the manager's first plan was refused (it is asked once more, told why)."""
    planning_usage: Usage | None = None
    extensions: dict[str, int] = {}
    """Parts (subtask ids, `synthesis`) the budget reserved more for -> tokens each added to the reservation."""
    throttled: bool = False
    """A ready subtask waits for a slot of its tenant's (max_parallel_per_tenant): the sweep tries again."""
    gates: Gates | None = None
    """The approvals of the record's own step (services/executor/approvals.py)."""

    def cursor_of(self, step: str) -> TaskRecord | SubtaskState | None:
        """What waits for `step`: the record's own step (the task's, or its synthesis) or a running subtask."""
        if self.phase == "board":  # the pools run it (distributed, hybrid) until a hybrid task's synthesis
            return None
        if self.phase != "subtasks" and self.step_id in (step, ""):
            return self
        return next((sub for sub in self.subtasks if sub.status == "running" and sub.step_id == step), None)

    def running_steps(self) -> list[tuple[str, float]]:
        """(step id, deadline) of every step it waits for."""
        if self.status != "running":
            return []
        if self.phase == "board":
            return []
        if self.phase != "subtasks":
            return [(self.step_id, self.step_deadline)] if self.step_id else []
        return [(sub.step_id, sub.step_deadline) for sub in self.subtasks if sub.status == "running"]


class CachedAnswer(msgspec.Struct, kw_only=True):
    """The last answer to one (agent, prompt), for chains that end in a `cache` strategy."""

    output: str
    model: str
    dependency: str
    stored_at: float


def admitted_from(step: StepEvent) -> TaskAdmitted:
    """The task as one of its steps tells it: who, which task, which agent (not its prompt or estimate).
    Enough to end a task whose record was lost."""
    return TaskAdmitted(task_id=step.task_id, tenant=step.tenant, user=step.user, spec=TaskSpec(agent=step.agent),
                        estimate=TokenEstimate(prompt_tokens=0, max_output_tokens=0), reserved_tokens=0, window="")



def step_id(tenant: str, task_id: str, strategy: int, attempt: int, subtask: str = "") -> str:
    """`<tenant>/<task>-s<strategy index>a<attempt>` (`<tenant>/<task>-<subtask>-s…` for a subtask's): one id per
    step, safe in KV keys and subjects. With the tenant, since steps of two tenants' tasks meet where no task
    does: in a breaker's probe leases."""
    return f"{tenant}/{task_id}-{subtask + '-' if subtask else ''}s{strategy}a{attempt}"


def cache_key(task: TaskAdmitted) -> str:
    """One answer per tenant, agent and prompt: a tenant is never answered with another's output."""
    spec = task.spec
    text = msgspec.json.encode([task.tenant, spec.agent, spec.prompt, spec.messages, spec.tools])
    return hashlib.sha256(text).hexdigest()
