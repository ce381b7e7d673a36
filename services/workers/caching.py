"""How a worker's step uses the response cache: exact hit, semantic hit, a coalesced call, or a model call
whose answer is kept (services/workers/cache.py, services/workers/semantic.py).

Coalescing (single flight): identical requests (the same exact key) in flight at once in one process make one
model call; the others wait for it and complete as `coalesced` hits, billed as the agent's `hit_billing` says.
With the agent's `coalesce_replicas`, also over replicas: a miss takes the key's lease in the bucket
(services/workers/leases.py), and a replica that finds it taken waits for the answer stored under the key.
Without it, the first answer stored serves every later request, on every replica, as an exact hit.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable

import anyio
import msgspec

from contracts import StepCompleted, StepFailed, StepRequested
from contracts.policy import Policy, ResponseCache
from contracts.state import CACHE_DEPENDENCY, dependency_key
from services.workers.cache import CachedAnswer, Request, Store, cacheable, describe, hit
from services.workers.conversation import Turn
from services.workers.leases import Leases
from services.workers.semantic import Index, threshold
from shared.embeddings import Embedder

log = logging.getLogger(__name__)
Outcome = StepCompleted | StepFailed
POLL_FIRST_S, POLL_MAX_S = 0.02, 0.25
"""How often a request waiting on another replica's lease reads the key and the lease (doubling up to the max)."""


class _Flight:
    def __init__(self) -> None:
        self.done = anyio.Event()
        self.outcome: Outcome | None = None


class Caching:
    def __init__(self, store: Store, policy: Callable[[], Policy], index: Index | None = None,
                 embedder: Embedder | None = None, leases: Leases | None = None) -> None:
        self.store = store
        self.leases = leases
        """Single flight over replicas (None: per process only, whatever the policy says)."""
        self.waiting = 0
        """Requests waiting now for another replica's answer."""
        self.policy = policy
        self.index = index or Index(lambda tenant, agent: self._limit(tenant, agent))
        self.embedder = embedder or Embedder()
        self.flights: dict[str, _Flight] = {}
        self.counts = {"exact": 0, "semantic": 0, "coalesced": 0, "misses": 0, "stored": 0,
                       "coalesced_replicas": 0, "leases": 0, "waits_unanswered": 0}

    def _limit(self, tenant: str, agent: str) -> int:
        settings = self.policy().cache_for(tenant, agent)
        return settings.max_entries if settings else ResponseCache.max_entries

    async def serve(self, step: StepRequested, messages: Iterable[Turn], tools: Iterable[str],
                    elapsed_ms: Callable[[], float], call: Callable[[], Awaitable[Outcome]]) -> Outcome:
        """The step's outcome: from the cache if it may, else `call()`'s (kept for the next one)."""
        settings = self.policy().cache_for(step.tenant, step.agent)
        if settings is None:
            return await call()
        request = describe(step, messages, tools)
        entry = await self.store.get(request, settings) if settings.store_answers else None
        if entry is not None:
            return self._hit(step, "exact", entry, settings, elapsed_ms())
        flight = self.flights.get(request.key) if settings.coalesce else None
        if flight is not None:  # before embedding: waiting for the same request costs nothing
            await flight.done.wait()
            if isinstance(flight.outcome, StepCompleted):
                return self._coalesced(step, flight.outcome, request, settings, elapsed_ms())
        vector = None
        if settings.semantic and settings.store_answers and len(request.text) <= settings.semantic_max_chars:
            vector = await self._embed(request, settings)
            found = self.index.match(request, vector, threshold(settings)) if vector is not None else None
            entry = await self.store.get(request, settings, key=found[0]) if found else None
            if entry is not None:  # the request's own key: stored while this one was embedded
                source = "exact" if found[0] == request.key else "semantic"
                return self._hit(step, source, entry, settings, elapsed_ms(), found[1])
        if not self._across_replicas(settings):
            return await self._call(step, request, settings, vector, call)
        return await self._call_over_replicas(step, request, settings, vector, call, elapsed_ms)

    async def _call_over_replicas(self, step: StepRequested, request: Request, settings: ResponseCache, vector,
                                  call: Callable[[], Awaitable[Outcome]],
                                  elapsed_ms: Callable[[], float]) -> Outcome:
        """Call the model holding the key's lease, or take the answer of the replica that holds it."""
        lease = await self.leases.take(request.key, self._lease_s(step, settings))
        if lease is None:  # another replica is calling the model for this request
            waited = await self._wait_for_replica(step, request, settings, elapsed_ms)
            if waited is not None:
                return waited
            lease = await self.leases.take(request.key, self._lease_s(step, settings))
        self.counts["leases"] += lease is not None
        try:
            return await self._call(step, request, settings, vector, call)
        finally:  # after the answer is stored: a waiter that sees the lease gone finds it, or knows none comes
            if lease is not None:
                with anyio.CancelScope(shield=True):
                    await self.leases.give_back(request.key, lease)

    def _across_replicas(self, settings: ResponseCache) -> bool:
        return (self.leases is not None and settings.coalesce_replicas and settings.coalesce
                and settings.store_answers)

    @staticmethod
    def _lease_s(step: StepRequested, settings: ResponseCache) -> float:
        return min(settings.lease_s, step.timeout_s) if step.timeout_s > 0 else settings.lease_s

    async def _wait_for_replica(self, step: StepRequested, request: Request, settings: ResponseCache,
                                elapsed_ms: Callable[[], float]) -> StepCompleted | None:
        """The answer another replica stores under the request's key, once it does; None once its lease is
        gone without one (its step failed, its answer is not kept, or it died and the lease lapsed), or after
        a lease's length in any case: a lease written without a TTL (poison in the bucket) holds no one up
        for longer."""
        self.waiting += 1
        pause, give_up = POLL_FIRST_S, time.monotonic() + self._lease_s(step, settings)
        try:
            while time.monotonic() < give_up:
                held = await self.leases.held(request.key)  # the lease first: it goes after the answer is stored
                entry = await self.store.get(request, settings)
                if entry is not None:
                    self.counts["coalesced_replicas"] += 1
                    return self._hit(step, "coalesced", entry, settings, elapsed_ms())
                if not held:
                    self.counts["waits_unanswered"] += 1
                    return None
                await anyio.sleep(pause)
                pause = min(POLL_MAX_S, pause * 2)
            log.warning("response cache: the lease of %s outlived its length; calling the model", request.key)
            self.counts["waits_unanswered"] += 1
            return None
        finally:
            self.waiting -= 1

    async def _call(self, step: StepRequested, request: Request, settings: ResponseCache, vector,
                    call: Callable[[], Awaitable[Outcome]]) -> Outcome:
        self.counts["misses"] += 1
        flight = _Flight()
        leading = settings.coalesce and request.key not in self.flights
        if leading:
            self.flights[request.key] = flight
        try:
            flight.outcome = await call()
        finally:
            if leading:
                self.flights.pop(request.key, None)
            flight.done.set()
        if isinstance(flight.outcome, StepCompleted):
            await self._keep(step, request, settings, vector, flight.outcome)
        return flight.outcome

    async def _keep(self, step: StepRequested, request: Request, settings: ResponseCache, vector,
                    outcome: StepCompleted) -> None:
        model = dependency_key(step.provider, step.model)
        tool_calls = sum(1 for c in outcome.calls or [] if c.dependency != model)
        why = cacheable(request, settings, outcome.output, tool_calls) or (
            "the policy keeps no answers" if not settings.store_answers else "")
        if why:
            log.debug("step %s not cached: %s", step.step_id, why)
            return
        embedding = vector.astype("<f4").tobytes() if vector is not None else b""
        await self.store.put(request, settings, outcome.output, outcome.usage, embedding)
        if vector is not None:
            self.index.add(request.key, request.tenant, request.agent, request.scope, vector, request.text)
        self.counts["stored"] += 1

    async def _embed(self, request: Request, settings: ResponseCache):
        provider = self.policy().provider(settings.embeddings_provider) if settings.embeddings_provider else None
        try:
            return await self.embedder.embed(request.text, provider, settings.embeddings_model)
        except Exception as error:  # noqa: BLE001 - no embedding: no semantic hit, the step goes on
            log.warning("semantic cache: no embedding for %s/%s (%s)", request.tenant, request.agent, error)
            return None

    def _hit(self, step: StepRequested, source: str, entry: CachedAnswer, settings: ResponseCache,
             latency_ms: float, similarity: float = 1.0) -> StepCompleted:
        self.counts[source] += 1
        account, bill = hit(source, entry, settings, self.policy().price_of(step.model), similarity)
        return StepCompleted(
            task_id=step.task_id, tenant=step.tenant, user=step.user, step_id=step.step_id, attempt=step.attempt,
            agent=step.agent, dependency=CACHE_DEPENDENCY, model=step.model, output=entry.answer, usage=bill,
            latency_ms=latency_ms, calls=[], turns=0, cache=account)

    def _coalesced(self, step: StepRequested, leader: StepCompleted, request: Request, settings: ResponseCache,
                   latency_ms: float) -> StepCompleted:
        entry = CachedAnswer(tenant=request.tenant, agent=request.agent, digest=request.digest, scope=request.scope,
                             model=request.model, text=request.text, answer=leader.output, usage=leader.usage,
                             stored_at=leader.occurred_at.timestamp())
        completed = self._hit(step, "coalesced", entry, settings, latency_ms)
        return msgspec.structs.replace(completed, compaction=leader.compaction)

    def stats(self) -> dict:
        return {**self.counts, "semantic_entries": self.index.size(), "refused_entries": self.store.refused,
                "in_flight": len(self.flights), "waiting_on_replicas": self.waiting}
