"""agent worker: run the model call a step asks for and report its outcome."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from contracts import ChatMessage, StepCompleted, StepFailed, StepRequested, TaskProgress, subjects
from contracts.state import dependency_key
from services.workers.errors import ProviderError, UnknownProvider
from services.workers.simulated import Completion
from shared.errors import PoisonMessage

Emit = Callable[[str, Any], Awaitable[None]]


class Provider(Protocol):
    name: str

    async def complete(self, *, model: str, messages: list[ChatMessage], max_tokens: int, call_id: str,
                       attempt: int) -> Completion: ...


class Worker:
    def __init__(self, worker_id: str, providers: dict[str, Provider], emit: Emit) -> None:
        self.worker_id = worker_id  # host-pid: progress events say who runs a step
        self.providers = providers
        self.emit = emit

    async def on_step(self, step: StepRequested) -> None:
        provider = self.providers.get(step.provider)
        if provider is None:
            raise PoisonMessage(str(UnknownProvider(f"no provider {step.provider!r} in this worker")))
        await self.emit(subjects.task_progress(step.tenant, step.task_id), TaskProgress(
            task_id=step.task_id, tenant=step.tenant, user=step.user, stage="step_started", attempt=step.attempt,
            worker=self.worker_id, message=f"{step.agent} worker {self.worker_id} calling {step.provider}/{step.model}"))
        started = time.perf_counter()
        dep = dependency_key(step.provider, step.model)
        try:
            messages = step.messages or [ChatMessage(role="user", content=step.prompt)]
            result = await provider.complete(model=step.model, messages=messages, max_tokens=step.max_tokens,
                                             call_id=step.step_id, attempt=step.attempt)
        except ProviderError as error:
            await self.emit(subjects.step_failed(step.tenant), StepFailed(
                task_id=step.task_id, tenant=step.tenant, user=step.user, step_id=step.step_id, attempt=step.attempt,
                agent=step.agent, dependency=dep, error=error.error_class, message=str(error),
                retry_after_s=error.retry_after_s))
            return
        await self.emit(subjects.step_completed(step.tenant), StepCompleted(
            task_id=step.task_id, tenant=step.tenant, user=step.user, step_id=step.step_id, attempt=step.attempt,
            agent=step.agent, dependency=dep, model=step.model, output=result.text, usage=result.usage,
            latency_ms=(time.perf_counter() - started) * 1000))
