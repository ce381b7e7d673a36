"""breaker service: step outcomes in; circuit state in the breaker bucket and BreakerChanged out."""

from __future__ import annotations

import time
from typing import Union

import anyio

from contracts import StepCompleted, StepFailed
from contracts import subjects as s
from contracts.state import BreakerRecord
from services.breaker.handlers import Breaker
from shared.breakers import BreakerView
from shared.bus import Bus
from shared.config import Settings
from shared.consume import Consumer, decoder_for
from shared.kv import TypedBucket
from shared.policy import PolicyView
from shared.runtime import micro_service
from shared.streams import consumer_config

NAME = "breaker"
TICK_S = 0.5


async def run(settings: Settings, stop: anyio.Event) -> None:
    async with Bus.connect(settings, NAME) as bus, micro_service(bus, "circuit breakers per dependency"):
        kv, policy_kv = await bus.bucket(s.KV_BREAKERS), await bus.policy_bucket()
        policy = await PolicyView.load(policy_kv)
        breaker = Breaker(policy, TypedBucket(kv, BreakerRecord, BreakerRecord), bus.emit, clock=time.time)
        view = BreakerView()
        outcomes = Consumer(bus, s.STREAM_STEPS,
                            consumer_config(settings, s.CONSUMER_BREAKER, s.ALL_STEP_COMPLETED, s.ALL_STEP_FAILED),
                            decoder_for(Union[StepCompleted, StepFailed]), breaker.on_outcome)

        async def half_open_when_due() -> None:
            while not stop.is_set():
                due = [dep for dep, rec in view.records.items() if rec.state == "open" and rec.allows_calls(time.time())]
                await breaker.tick(due)
                await anyio.sleep(TICK_S)

        async with anyio.create_task_group() as tg:
            tg.start_soon(view.follow, kv, stop)
            tg.start_soon(policy.follow, policy_kv, stop)
            tg.start_soon(half_open_when_due)
            await outcomes.run(stop)
            tg.cancel_scope.cancel()
