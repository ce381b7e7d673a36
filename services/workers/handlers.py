"""agent worker: run the step an executor asks for, an agent loop of model and tool calls, and report its outcome.

Each call goes to a dependency with a breaker: a model (`provider/model`), a tool (`tool/NAME`) or an MCP
server's tool (`mcp/SERVER/TOOL`). Before each call the worker asks its breaker view (and, in half-open,
the breaker for a probe lease); a dependency it may not call fails the step at once with `breaker_open`,
without calling it. The step's `timeout_s` bounds the whole step here: when it passes, the call in flight
is abandoned and the step fails as `timeout`. The outcome lists every call with its error class and
latency, which is what the breaker counts, and the usage of every model call, summed: a failed step's too
(what its model calls used before it failed), so that the budget bills it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, Protocol, TypeVar

import anyio

from contracts import Call, StepCompleted, StepFailed, StepRequested, TaskProgress, Usage, subjects
from contracts.events import ErrorClass, PromptCompacted, clip
from contracts.policy import DEFAULT_POLICY, AgentPolicy, Policy
from contracts.state import dependency_key, tool_key
from services.workers import compaction, gates, telemetry, tiering
from services.workers.agent import AgentLoop, MaxTurnsReached
from services.workers.batching import Batcher
from services.workers.caching import Caching
from services.workers.conversation import Provider, Tool
from services.workers.errors import CircuitOpen, ProviderError, UnknownProvider
from services.workers.streaming import DeltaPublisher
from shared.breakers import BreakerGate
from shared.errors import PoisonMessage

Emit = Callable[[str, Any], Awaitable[None]]
Clock = Callable[[], float]
T = TypeVar("T")


class Providers(Protocol):
    def get(self, name: str) -> Provider | None: ...


class Tools(Protocol):
    def get(self, name: str) -> Tool | None: ...


class Worker:
    def __init__(self, worker_id: str, providers: Providers | dict[str, Provider], emit: Emit, *,
                 tools: Tools | None = None, gate: BreakerGate | None = None, clock: Clock = time.time,
                 notify: Emit | None = None, policy: Callable[[], Policy] = lambda: DEFAULT_POLICY,
                 trace_content: bool = False, caching: Caching | None = None,
                 approved_calls: gates.ApprovedCalls | None = None, batcher: Batcher | None = None) -> None:
        self.worker_id = worker_id  # host-pid: progress events say who runs a step
        self.providers = providers
        self.emit = emit
        self.notify = notify or emit
        """For progress news: need not wait for the stream to store it."""
        self.tools = tools
        self.gate = gate
        self.clock = clock
        self.policy = policy
        self.trace_content = trace_content
        self.caching = caching
        """The response cache (services/workers/caching.py); None: every step calls its model."""
        self.approved_calls = approved_calls
        self.batcher = batcher
        """Sends the model calls of agents with `batching` on in batches; None: every call on its own."""

    async def on_step(self, step: StepRequested) -> None:
        provider = self.providers.get(step.provider)
        if provider is None:
            raise PoisonMessage(str(UnknownProvider(f"no provider {step.provider!r} in this worker")))
        await self.notify(subjects.task_progress(step.tenant, step.task_id), TaskProgress(
            task_id=step.task_id, tenant=step.tenant, user=step.user, stage="step_started", attempt=step.attempt,
            worker=self.worker_id, step_id=step.step_id,
            message=f"{step.agent} worker {self.worker_id} calling {step.provider}/{step.model}"))
        run = StepRun(step, self.gate)
        deltas = DeltaPublisher(step, self.worker_id, self.notify)
        left = self._time_left(step)
        outcome: StepCompleted | StepFailed | None = None
        with telemetry.agent_span(step, provider.system) as span:
            if left <= 0:
                outcome = run.failed(run.model, "timeout", "the step's deadline passed before it started")
            else:
                with anyio.move_on_after(left):
                    async with anyio.create_task_group() as streaming:
                        streaming.start_soon(deltas.pump)
                        outcome = await self._attempt(step, provider, run, deltas)
                        streaming.cancel_scope.cancel()
            if outcome is None:  # the timeout passed with a call in flight
                outcome = run.timed_out(left)
            if isinstance(outcome, StepFailed):
                telemetry.failed(span, outcome.error)
            await deltas.flush()  # the answer's last pieces before its end
        subject = subjects.step_completed if isinstance(outcome, StepCompleted) else subjects.step_failed
        await self.emit(subject(step.tenant), outcome)

    def _time_left(self, step: StepRequested) -> float:
        left = step.timeout_s if step.timeout_s > 0 else math.inf
        if step.deadline_at > 0:
            left = min(left, step.deadline_at - self.clock())
        return left

    def _offered(self, step: StepRequested, agent: AgentPolicy | None) -> tuple[dict[str, Tool], str]:
        """The tools this step may call (the task's, within the agent's list), or the one it lacks."""
        offered: dict[str, Tool] = {}
        for name in step.tools:
            if agent is not None and agent.tools is not None and name not in agent.tools:
                continue
            tool = self.tools.get(name) if self.tools is not None else None
            if tool is None:
                return offered, name
            offered[name] = tool
        return offered, ""

    async def _attempt(self, step: StepRequested, provider: Provider, run: StepRun,
                       deltas: DeltaPublisher) -> StepCompleted | StepFailed:
        policy = self.policy()
        agent = policy.agents.get(step.agent)
        tools, missing = self._offered(step, agent)
        if missing:
            return run.failed(tool_key(missing), "permanent",
                              f"this worker has no tool {missing!r} (built-in, plug-in or MCP); the task names it")
        limit = policy.workers.max_tool_output_chars
        if agent is not None and agent.compaction.enabled:
            limit = min(limit, agent.compaction.max_tool_output_chars)
        if self.batcher is not None:
            provider = self.batcher.batched(provider, agent)
        loop = AgentLoop(step, provider, tools, run.call, model_dependency=run.model,
                         max_turns=agent.max_turns if agent else AgentPolicy.max_turns,
                         max_tool_output_chars=limit,
                         system_prompt=agent.system_prompt if agent else "", on_text=deltas.feed,
                         trace_content=self.trace_content, approved_calls=self.approved_calls)
        run.spent = lambda: loop.usage  # a failure from here on bills what the loop's model calls used
        compacted = None
        if agent is not None and agent.compaction.enabled:
            loop.messages, compacted = compaction.compact(loop.messages, agent.compaction, step.model)
        answer = partial(self._answer, step, run, loop, deltas, agent, compacted)
        if self.caching is None or gates.bypasses_cache(step):
            return await answer()
        return await self.caching.serve(step, loop.messages, tools, run.elapsed_ms, answer)

    async def _answer(self, step: StepRequested, run: StepRun, loop: AgentLoop, deltas: DeltaPublisher,
                      agent: AgentPolicy | None, compacted: PromptCompacted | None) -> StepCompleted | StepFailed:
        try:
            answer = await loop.run()
        except gates.Gated as gate:  # waits for a person: not a failure
            return gates.completed(step, gate, self.worker_id, dependency=run.model, latency_ms=run.elapsed_ms(),
                                   calls=run.calls, refused_tool_calls=loop.refused)
        except CircuitOpen as closed:
            return run.failed(closed.dependency, "transient", str(closed), breaker_open=True)
        except MaxTurnsReached as error:
            return run.failed(run.model, error.error_class, str(error))
        except ProviderError as error:
            return run.failed(run.calls[-1].dependency, error.error_class, str(error), error.retry_after_s)
        invalid = tiering.invalid_answer(step, agent, answer.text)
        if invalid:
            return run.failed(run.model, "permanent", f"the fast tier's answer failed validation ({invalid}): "
                                                      f"the chain escalates to the advanced tier")
        return StepCompleted(
            task_id=step.task_id, tenant=step.tenant, user=step.user, step_id=step.step_id, attempt=step.attempt,
            agent=step.agent, dependency=run.model, model=step.model, output=answer.text,
            usage=answer.usage, latency_ms=run.elapsed_ms(), calls=run.calls, turns=answer.turns,
            refused_tool_calls=answer.refused_tool_calls, first_token_ms=deltas.first_token_ms(),
            compaction=compacted)


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
        self.spent: Callable[[], Usage] = lambda: Usage(input_tokens=0, output_tokens=0)
        """What the step's model calls have used so far (its agent loop's sum, once there is one)."""

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
        step, spent = self.step, self.spent()
        return StepFailed(  # a provider's error text may be a whole page: the contract keeps its start
            task_id=step.task_id, tenant=step.tenant, user=step.user, step_id=step.step_id, attempt=step.attempt,
            agent=step.agent, dependency=dependency, error=error, message=clip(message), retry_after_s=retry_after_s,
            calls=self.calls, latency_ms=self.elapsed_ms(), breaker_open=breaker_open, model=step.model,
            usage=spent if spent.total or spent.cached_tokens else None)
