"""Batching (an agent's `batching` policy, docs/caching.md): the model calls of a worker's concurrent steps,
held per provider and model and sent together through the provider's batch API, at its batch price.

A call joins the open group of its provider and model, or opens one. The group is sent when `max_batch`
calls wait in it, or when the earliest of their waits is up (each call waits at most its agent's
`max_wait_ms`). Sending runs in the batcher's own task group, not in any one step's, so a step that times out
leaves the others' batch alone: a call whose step gave up before its group was sent leaves the group, and
a batch every call of which gave up is canceled at the provider.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio

from contracts.policy import AgentPolicy, Batching
from services.workers.conversation import Completion, ModelRequest, OnText, Provider
from services.workers.errors import ProviderError, TransientProviderError
from services.workers.providers.batches import MessageBatches, Outcome

log = logging.getLogger(__name__)
Clock = Callable[[], float]


@dataclass(eq=False)
class _Waiter:
    request: ModelRequest
    due: float
    """When this call's wait is up (monotonic seconds)."""
    done: anyio.Event = field(default_factory=anyio.Event)
    outcome: Outcome | None = None
    gave_up: bool = False
    """Its step stopped waiting (it timed out) after the group was sent."""


@dataclass(eq=False)
class _Group:
    batches: MessageBatches
    settings: Batching
    waiters: list[_Waiter] = field(default_factory=list)
    changed: anyio.Event = field(default_factory=anyio.Event)
    full: bool = False
    """`max_batch` calls wait in it: it takes no more, and is sent now."""
    sent: bool = False


class BatchedProvider:
    """A provider whose calls go through the batcher (the agent loop sees a provider like any other)."""

    def __init__(self, provider: Provider, batches: MessageBatches, batcher: Batcher, settings: Batching) -> None:
        self.name = provider.name
        self.system = provider.system
        self.batches = batches
        self.batcher = batcher
        self.settings = settings

    async def complete(self, request: ModelRequest, on_text: OnText | None = None) -> Completion:
        return await self.batcher.complete(self.name, self.batches, request, self.settings)


class Batcher:
    def __init__(self, clock: Clock = time.monotonic) -> None:
        self.clock = clock
        self.open: dict[tuple[str, str], _Group] = {}
        self._tasks: anyio.abc.TaskGroup | None = None
        self.batches_sent = 0
        self.calls_sent = 0
        self.largest = 0

    def batched(self, provider: Provider, agent: AgentPolicy | None) -> Provider:
        """`provider`, through the batcher when the agent batches and the provider has a batch API; else as is."""
        api = getattr(provider, "api", None)
        if (self._tasks is None or agent is None or not agent.batching.enabled
                or not getattr(provider, "batches", False) or api is None):
            return provider
        return BatchedProvider(provider, MessageBatches(api), self, agent.batching)

    async def run(self, stop: anyio.Event, *, task_status: anyio.abc.TaskStatus = anyio.TASK_STATUS_IGNORED) -> None:
        """Send the groups as they fill or their waits end, until `stop`; then fail the calls still waiting.
        Started with `TaskGroup.start`, it returns once calls can be batched."""
        try:
            async with anyio.create_task_group() as tasks:
                self._tasks = tasks
                task_status.started()
                await stop.wait()
                tasks.cancel_scope.cancel()
        finally:
            self._tasks = None
            for group in self.open.values():
                self._settle(group.waiters, TransientProviderError("the worker stopped before the batch was sent"))
            self.open.clear()

    async def complete(self, provider: str, batches: MessageBatches, request: ModelRequest,
                       settings: Batching) -> Completion:
        if self._tasks is None:
            raise TransientProviderError("the worker's batcher is not running")
        key = (provider, request.model)
        group = self.open.get(key)
        if group is None:
            group = self.open[key] = _Group(batches, settings)
            self._tasks.start_soon(self._send_when_due, key, group)
        group.settings = settings
        waiter = _Waiter(request, self.clock() + settings.max_wait_ms / 1000)
        group.waiters.append(waiter)
        if len(group.waiters) >= settings.max_batch:
            group.full = True
            del self.open[key]  # the next call opens a group of its own
        group.changed.set()
        try:
            await waiter.done.wait()
        finally:
            waiter.gave_up = not waiter.done.is_set()
            if not group.sent and waiter in group.waiters:  # its step gave up before the group was sent
                group.waiters.remove(waiter)
                group.changed.set()
        assert waiter.outcome is not None
        if isinstance(waiter.outcome, ProviderError):
            raise waiter.outcome
        return waiter.outcome

    async def _send_when_due(self, key: tuple[str, str], group: _Group) -> None:
        while group.waiters and not group.full:
            group.changed = anyio.Event()
            with anyio.move_on_after(max(0.0, min(w.due for w in group.waiters) - self.clock())) as waited:
                await group.changed.wait()
            if waited.cancelled_caught:
                break
        group.sent = True
        if self.open.get(key) is group:
            del self.open[key]
        if group.waiters:
            await self._send(group)

    async def _send(self, group: _Group) -> None:
        waiters = list(group.waiters)
        self.batches_sent += 1
        self.calls_sent += len(waiters)
        self.largest = max(self.largest, len(waiters))
        try:
            outcomes = await group.batches.run([w.request for w in waiters], poll_s=group.settings.poll_s,
                                               wanted=lambda: not all(w.gave_up for w in waiters))
        except ProviderError as error:
            log.warning("a batch of %d calls failed: %s", len(waiters), error)
            self._settle(waiters, error)
            return
        for waiter, outcome in zip(waiters, outcomes):
            waiter.outcome = outcome
            waiter.done.set()

    @staticmethod
    def _settle(waiters: list[_Waiter], error: ProviderError) -> None:
        for waiter in waiters:
            waiter.outcome = error
            waiter.done.set()

    def stats(self) -> dict:
        return {"batches_sent": self.batches_sent, "calls_sent": self.calls_sent, "largest_batch": self.largest,
                "waiting": sum(len(group.waiters) for group in self.open.values())}
