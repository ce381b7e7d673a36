"""executor: one step per attempt; retry retryable failures with backoff; finish the task.

Every handler publishes first and records after, so a crash between the two is
repaired by redelivery: the repeated publish carries the same Nats-Msg-Id and
the stream drops it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from contracts import (
    RETRYABLE,
    Attempt,
    StepCompleted,
    StepFailed,
    StepRequested,
    TaskAdmitted,
    TaskCompleted,
    TaskFailed,
    TaskProgress,
    subjects,
)
from contracts.events import FailReason
from contracts.state import dependency_key
from services.executor.state import TaskRecord, step_id
from shared.breakers import BreakerView
from shared.errors import PoisonMessage, TransientError
from contracts.policy import Policy, Strategy
from shared.kv import TypedBucket

Emit = Callable[[str, Any], Awaitable[None]]
CurrentPolicy = Callable[[], Policy]


class Executor:
    def __init__(self, policy: CurrentPolicy, tasks: TypedBucket[TaskRecord], breakers: BreakerView,
                 emit: Emit) -> None:
        self.policy = policy
        self.tasks = tasks
        self.breakers = breakers
        self.emit = emit

    async def on_admitted(self, task: TaskAdmitted) -> None:
        record = await self.tasks.get(task.task_id)
        if record is not None:
            if record.status == "running":  # a redelivery: make sure the current step was asked for
                await self._request_step(record.task, record.attempt)
            return
        record = TaskRecord(task=task, admitted_at=time.time())
        strategy = self._strategy(task)
        if strategy is None:
            await self._fail(record, "permanent_error", f"agent kind {task.spec.agent!r} is not in the policy")
            return
        dep = dependency_key(strategy.provider, strategy.model)
        if not self.breakers.allows(dep):
            await self._fail(record, "breaker_open", f"circuit for {dep} is open; not calling it")
            return
        await self._request_step(task, 1)
        await self.tasks.put(task.task_id, record)

    async def on_step(self, step: StepCompleted | StepFailed) -> None:
        if isinstance(step, StepCompleted):
            await self.on_step_completed(step)
        else:
            await self.on_step_failed(step)

    async def on_step_completed(self, step: StepCompleted) -> None:
        record = await self._record_of(step)
        if record.status != "running":
            return
        completed = TaskCompleted(task_id=step.task_id, tenant=step.tenant, user=step.user, output=step.output,
                                  usage=step.usage, attempts=step.attempt, model=step.model)
        await self.emit(subjects.task_completed(step.tenant), completed)
        record.status, record.usage = "completed", step.usage
        await self.tasks.put(step.task_id, record)

    async def on_step_failed(self, step: StepFailed) -> None:
        record = await self._record_of(step)
        if record.status != "running" or record.attempt != step.attempt:
            return  # finished, or an outcome of an attempt we already moved past
        record.attempts.append(
            Attempt(step_id=step.step_id, dependency=step.dependency, error=step.error, message=step.message))
        retryable = step.error in RETRYABLE
        strategy = self._strategy(record.task)
        if not retryable or strategy is None or step.attempt >= strategy.max_attempts:
            reason: FailReason = "attempts_exhausted" if retryable else "permanent_error"
            await self._fail(record, reason, f"{step.error}: {step.message}")
            return
        await anyio.sleep(self._backoff(step))
        record.attempt = step.attempt + 1
        await self.emit(subjects.task_progress(step.tenant, step.task_id), TaskProgress(
            task_id=step.task_id, tenant=step.tenant, user=step.user, stage="retrying", attempt=record.attempt,
            message=f"attempt {step.attempt} failed ({step.error}: {step.message}); retrying"))
        await self._request_step(record.task, record.attempt)
        await self.tasks.put(step.task_id, record)

    async def _record_of(self, step: StepCompleted | StepFailed) -> TaskRecord:
        record = await self.tasks.get(step.task_id)
        if record is None:
            # A fast worker can answer before on_admitted has written the record (it publishes
            # the step first): come back once it is there.
            raise TransientError(f"no record of task {step.task_id} yet", retry_after_s=0.2)
        return record

    def _backoff(self, step: StepFailed) -> float:
        """Exponential backoff with full jitter, at least what the dependency asked for."""
        retry = self.policy().retry
        ceiling = min(retry.backoff_max_s, retry.backoff_base_s * 2 ** (step.attempt - 1))
        return max(step.retry_after_s or 0.0, random.uniform(0, ceiling))

    def _strategy(self, task: TaskAdmitted) -> Strategy | None:
        """The strategy the task's agent kind runs on (the head of its chain)."""
        agent = self.policy().agents.get(task.spec.agent)
        return agent.chain[0] if agent and agent.chain else None

    async def _request_step(self, task: TaskAdmitted, attempt: int) -> None:
        strategy = self._strategy(task)
        if strategy is None:
            raise PoisonMessage(f"agent kind {task.spec.agent!r} is not in the policy")
        request = StepRequested(
            task_id=task.task_id, tenant=task.tenant, user=task.user, step_id=step_id(task.task_id, attempt),
            attempt=attempt, agent=task.spec.agent, provider=strategy.provider, model=strategy.model,
            prompt=task.spec.prompt, messages=task.spec.chat(), max_tokens=task.estimate.max_output_tokens,
        )
        await self.emit(subjects.step_requested(task.spec.agent), request)

    async def _fail(self, record: TaskRecord, reason: FailReason, last_error: str) -> None:
        task = record.task
        failed = TaskFailed(task_id=task.task_id, tenant=task.tenant, user=task.user, reason=reason,
                            error=f"All strategies failed. Last error: {last_error}", attempts=record.attempts)
        await self.emit(subjects.task_failed(task.tenant), failed)
        record.status = "failed"
        await self.tasks.put(task.task_id, record)

    async def task_status(self, task_id: str) -> TaskRecord | None:
        return await self.tasks.get(task_id)
