"""guard service: TaskSubmitted in, TaskValidated or TaskRejected out."""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial

import anyio

from contracts import subjects as s
from services.guard.claims import CLAIM_TTL_S, Claim
from services.guard.handlers import Guard, decode_submission
from services.guard.limiter import Cell, RateLimiter
from services.monitor.handlers import percentiles
from shared.bus import Bus
from shared.config import Settings
from shared.consume import Consumer
from shared.kv import TypedBucket
from shared.policy import PolicyView
from shared.quarantine import Quarantine
from shared.runtime import micro_service
from shared.streams import consumer_config

NAME = "guard"


async def run(settings: Settings, stop: anyio.Event, *, clock: Callable[[], float] = time.time) -> None:
    """`clock`: what the rate limiter takes for now (unix seconds)."""
    async with Bus.connect(settings, NAME) as bus:
        policy_kv, rates_kv = await bus.policy_bucket(), await bus.bucket(s.KV_RATES)
        quarantine = Quarantine(bus.js, NAME)
        policy = await PolicyView.load(policy_kv, quarantine)
        cells = TypedBucket(rates_kv, Cell, Cell, quarantine=quarantine)
        claims = TypedBucket(await bus.bucket(s.KV_SUBMISSIONS), Claim, lambda: None, expires=lambda _: CLAIM_TTL_S,
                             quarantine=quarantine)
        guard = Guard(policy, RateLimiter(cells, clock=clock), bus.emit, claims)
        submissions = Consumer(
            bus,
            s.STREAM_INGRESS,
            consumer_config(settings, s.CONSUMER_GUARD, s.ALL_SUBMITTED),
            partial(decode_submission, max_payload_bytes=settings.max_payload_bytes),
            guard.on_submission,
            with_delivery=True,  # the subject's tenant and the stream's receipt time
        )

        def stats() -> dict:
            timing = percentiles(guard.decision_ms)
            return {"policy_version": policy.version, "policy_switched_at": policy.since,
                    "shadow": policy().shadow, "decisions": dict(guard.decisions),
                    "decision_p50_ms": timing.p50_ms, "decision_p99_ms": timing.p99_ms,
                    "consumer": submissions.stats_dict(), "policy": policy.stats(), "quarantined": quarantine.stats()}

        async with micro_service(bus, "validates, rate-limits and estimates submitted tasks", stats=stats), \
                anyio.create_task_group() as tg:
            tg.start_soon(policy.follow, policy_kv, stop)
            await submissions.run(stop)
            tg.cancel_scope.cancel()
