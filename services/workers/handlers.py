"""agent worker: run the step an executor asks for (its tools, then the model call) and report its outcome.

Each call goes to a dependency with a breaker: a model (`provider/model`) or a tool
(`tool/NAME`). Before each call the worker asks its breaker view (and, in half-open,
the breaker for a probe lease); a dependency it may not call fails the step at once
with `breaker_open`, without calling it. The step's `timeout_s` bounds the whole step
here: when it passes, the call in flight is abandoned and the step fails as `timeout`.
The outcome lists every call with its error class and latency, which is what the
breaker counts.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import anyio

from contracts import Call, ChatMessage, StepCompleted, StepFailed, StepRequested, TaskProgress, subjects
from contracts.events import ErrorClass, clip
from contracts.state import dependency_key, tool_key
from services.workers.errors import CircuitOpen, ProviderError, UnknownProvider
from services.workers.simulated import Completion
from shared.breakers import BreakerGate
from shared.errors import PoisonMessage

Emit = Callable[[str, Any], Awaitable[None]]
Clock = Callable[[], float]
T = TypeVar("T")


class Provider(Protocol):
    name: str

    async def complete(self, *, model: str, messages: list[ChatMessage], max_tokens: int, call_id: str,
                       attempt: int) -> Completion: ...


class Tools(Protocol):
    async def call(self, tool: str, query: str) -> str: ...


class Worker:
    def __init__(self, worker_id: str, providers: dict[str, Provider], emit: Emit, *, tools: Tools | None = None,
                 gate: BreakerGate | None = None, clock: Clock = time.time, notify: Emit | None = None) -> None:
        self.worker_id = worker_id  # host-pid: progress events say who runs a step
        self.providers = providers
        self.emit = emit
        self.notify = notify or emit
        """For progress news: need not wait for the stream to store it."""
        self.tools = tools
        self.gate = gate
        self.clock = clock

    async def on_step(self, step: StepRequested) -> None:
        provider = self.providers.get(step.provider)
        if provider is None:
            raise PoisonMessage(str(UnknownProvider(f"no provider {step.provider!r} in this worker")))
        await self.notify(subjects.task_progress(step.tenant, step.task_id), TaskProgress(
            task_id=step.task_id, tenant=step.tenant, user=step.user, stage="step_started", attempt=step.attempt,
            worker=self.worker_id, step_id=step.step_id,
            message=f"{step.agent} worker {self.worker_id} calling {step.provider}/{step.model}"))
        run = StepRun(step, self.gate)
        left = self._time_left(step)
        outcome: StepCompleted | StepFailed | None = None
        if left <= 0:
            outcome = run.failed(run.model, "timeout", "the step's deadline passed before it started")
        else:
            with anyio.move_on_after(left):
                outcome = await self._attempt(step, provider, run)
        if outcome is None:  # the timeout passed with a call in flight
            outcome = run.timed_out(left)
        subject = subjects.step_completed if isinstance(outcome, StepCompleted) else subjects.step_failed
        await self.emit(subject(step.tenant), outcome)

    def _time_left(self, step: StepRequested) -> float:
        left = step.timeout_s if step.timeout_s > 0 else math.inf
        if step.deadline_at > 0:
            left = min(left, step.deadline_at - self.clock())
        return left

    async def _attempt(self, step: StepRequested, provider: Provider, run: StepRun) -> StepCompleted | StepFailed:
        messages = step.messages or [ChatMessage(role="user", content=step.prompt)]
        try:
            for tool in step.tools:  # the simulated agent loop: gather each tool's result, then ask the model
                if self.tools is None:
                    raise PoisonMessage(f"step names tool {tool!r} but this worker has no tools")
                result = await run.call(tool_key(tool), lambda tool=tool: self.tools.call(tool, step.prompt))
                messages = [*messages, ChatMessage(role="tool", name=tool, content=result)]
            completion = await run.call(run.model, lambda: provider.complete(
                model=step.model, messages=messages, max_tokens=step.max_tokens, call_id=step.step_id,
                attempt=step.attempt))
        except CircuitOpen as closed:
            return run.failed(closed.dependency, "transient", str(closed), breaker_open=True)
        except ProviderError as error:
            return run.failed(run.calls[-1].dependency, error.error_class, str(error), error.retry_after_s)
        return StepCompleted(
            task_id=step.task_id, tenant=step.tenant, user=step.user, step_id=step.step_id, attempt=step.attempt,
            agent=step.agent, dependency=run.model, model=step.model, output=completion.text,
            usage=completion.usage, latency_ms=run.elapsed_ms(), calls=run.calls)


class StepRun:
    """One step's calls so far, and the one in flight (reported as the timeout if the step runs out of time)."""

    def __init__(self, step: StepRequested, gate: BreakerGate | None) -> None:
        self.step = step
        self.gate = gate
        self.model = dependency_key(step.provider, step.model)
        self.calls: list[Call] = []
        self.started = time.perf_counter()
        self.in_flight: tuple[str, float, float] | None = None
        """(dependency, unix start, perf_counter start) of the call under way."""

    async def call(self, dependency: str, make_call: Callable[[], Awaitable[T]]) -> T:
        if self.gate is not None and not await self.gate.permits(dependency, self.step.step_id):
            raise CircuitOpen(dependency)
        self.in_flight = (dependency, time.time(), time.perf_counter())
        try:
            result = await make_call()
        except ProviderError as error:
            self._settle(error.error_class)
            raise
        self._settle(None)
        return result

    def _settle(self, error: ErrorClass | None) -> None:
        assert self.in_flight is not None
        dependency, started_at, started = self.in_flight
        self.calls.append(Call(dependency=dependency, error=error, started_at=started_at,
                               latency_ms=(time.perf_counter() - started) * 1000))
        self.in_flight = None

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000

    def timed_out(self, limit_s: float) -> StepFailed:
        dependency = self.in_flight[0] if self.in_flight else self.model
        if self.in_flight:
            self._settle("timeout")
        return self.failed(dependency, "timeout", f"{dependency} did not answer within the step's {limit_s:.3g} s")

    def failed(self, dependency: str, error: ErrorClass, message: str, retry_after_s: float | None = None, *,
               breaker_open: bool = False) -> StepFailed:
        step = self.step
        return StepFailed(  # a provider's error text may be a whole page: the contract keeps its start
            task_id=step.task_id, tenant=step.tenant, user=step.user, step_id=step.step_id, attempt=step.attempt,
            agent=step.agent, dependency=dependency, error=error, message=clip(message), retry_after_s=retry_after_s,
            calls=self.calls, latency_ms=self.elapsed_ms(), breaker_open=breaker_open)
