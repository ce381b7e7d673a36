"""budget: admit a validated task if its estimate fits, bill each step once, release the rest."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from functools import partial
from typing import Any

from contracts import StepCompleted, TaskAdmitted, TaskCompleted, TaskFailed, TaskRejected, TaskValidated, subjects
from services.budget.errors import OverBudget
from services.budget.ledger import Ledger, day_window, next_day, post, release, reserve
from contracts.policy import Policy
from shared.kv import TypedBucket

Emit = Callable[[str, Any], Awaitable[None]]
Clock = Callable[[], datetime]


def ledger_key(tenant: str, user: str, window: str) -> str:
    return f"ledger.{tenant}.{user}.{window}"


def task_key(task_id: str) -> str:
    return f"task.{task_id}"


class Budget:
    """The budget's handlers and the two things they need: the ledger bucket and a clock."""

    def __init__(self, policy: Callable[[], Policy], ledgers: TypedBucket[Ledger], windows: TypedBucket[str],
                 emit: Emit, clock: Clock) -> None:
        self.policy = policy
        self.ledgers = ledgers
        self.windows = windows  # task id -> the window its reservation was made in
        self.emit = emit
        self.clock = clock

    async def on_validated(self, task: TaskValidated) -> None:
        try:
            window = await self._reserve(task)
        except OverBudget as refusal:
            rejected = TaskRejected(task_id=task.task_id, tenant=task.tenant, user=task.user, reason="over_budget",
                                    message=str(refusal), stage="budget", retry_after_s=refusal.retry_after_s)
            await self.emit(subjects.task_rejected(task.tenant), rejected)
            return
        admitted = TaskAdmitted(task_id=task.task_id, tenant=task.tenant, user=task.user, spec=task.spec,
                                estimate=task.estimate, reserved_tokens=task.estimate.total, window=window)
        await self.emit(subjects.task_admitted(task.tenant), admitted)

    async def _reserve(self, task: TaskValidated) -> str:
        now = self.clock()
        window = await self.windows.get(task_key(task.task_id)) or day_window(now)
        await self.windows.put(task_key(task.task_id), window)  # first, so a crash never strands a reservation
        limit = self.policy().budget_for(task.tenant, task.user).daily_tokens
        amount = task.estimate.total
        key = ledger_key(task.tenant, task.user, window)

        def change(ledger: Ledger) -> tuple[bool, int]:
            return reserve(ledger, task.task_id, amount, limit), ledger.remaining(limit)

        admitted, left = await self.ledgers.update(key, change)
        if not admitted:
            resets = next_day(now)
            raise OverBudget(
                f"daily budget of {limit:,} tokens: {max(left, 0):,} left, this task needs about {amount:,}; "
                f"it resets at {resets:%Y-%m-%d %H:%M} UTC (ask for fewer max_tokens or wait)",
                retry_after_s=(resets - now).total_seconds(),
            )
        return window

    async def on_step_completed(self, step: StepCompleted) -> None:
        key = await self._ledger_of(step.task_id, step.tenant, step.user, step.occurred_at)
        await self.ledgers.update(key, partial(post, task_id=step.task_id, step_id=step.step_id,
                                               used=step.usage.total))

    async def on_task_finished(self, task: TaskCompleted | TaskFailed) -> None:
        key = await self._ledger_of(task.task_id, task.tenant, task.user, task.occurred_at)
        await self.ledgers.update(key, partial(release, task_id=task.task_id))

    async def _ledger_of(self, task_id: str, tenant: str, user: str, when: datetime) -> str:
        window = await self.windows.get(task_key(task_id)) or day_window(when)
        return ledger_key(tenant, user, window)

