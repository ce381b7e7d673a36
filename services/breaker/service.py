"""breaker service: step outcomes in; circuit state in the breaker bucket and BreakerChanged out.

Endpoints (NATS micro, one replica answers each request): `corral.breakers.probe`
grants half-open probe leases, `corral.breakers.control` takes operators' force
and release commands. A tick moves due circuits to half-open and frees expired leases.
"""

from __future__ import annotations

import time
from typing import Union

import anyio
import msgspec

from contracts import StepCompleted, StepFailed
from contracts import subjects as s
from contracts.commands import AcquireProbe, ControlBreaker
from contracts.state import BreakerRecord
from services.breaker.handlers import Breaker
from shared.breakers import BreakerView
from shared.bus import Bus
from shared.config import Settings
from shared.consume import Consumer, decoder_for
from shared.kv import TypedBucket
from shared.policy import PolicyView
from shared.quarantine import Quarantine
from shared.runtime import micro_service
from shared.streams import consumer_config

NAME = "breaker"
TICK_S = 0.25
_probe = msgspec.json.Decoder(AcquireProbe).decode
_control = msgspec.json.Decoder(ControlBreaker).decode


async def run(settings: Settings, stop: anyio.Event) -> None:
    async with Bus.connect(settings, NAME) as bus:
        kv, policy_kv = await bus.bucket(s.KV_BREAKERS), await bus.policy_bucket()
        quarantine = Quarantine(bus.js, NAME)
        policy = await PolicyView.load(policy_kv, quarantine)
        breaker = Breaker(policy, TypedBucket(kv, BreakerRecord, BreakerRecord, quarantine=quarantine), bus.emit,
                          clock=time.time)
        view = BreakerView(quarantine)
        outcomes = Consumer(bus, s.STREAM_STEPS,
                            consumer_config(settings, s.CONSUMER_BREAKER, s.ALL_STEP_COMPLETED, s.ALL_STEP_FAILED),
                            decoder_for(Union[StepCompleted, StepFailed]), breaker.on_outcome)

        async def probe(data: bytes) -> bytes:
            return msgspec.json.encode(await breaker.acquire_probe(_probe(data)))

        async def control(data: bytes) -> bytes:
            return msgspec.json.encode(await breaker.control(_control(data)))

        async def tick() -> None:
            while not stop.is_set():
                await breaker.tick(list(view.records.values()))
                with anyio.move_on_after(TICK_S):
                    await stop.wait()

        def stats() -> dict:
            return {"breakers": view.snapshot(), "consumer": outcomes.stats_dict(), "policy": policy.stats(),
                    "quarantined": quarantine.stats()}

        endpoints = {"probe": (s.BREAKER_PROBE, probe), "control": (s.BREAKER_CONTROL, control)}
        async with micro_service(bus, "circuit breakers per dependency", endpoints, stats=stats), \
                anyio.create_task_group() as tg:
            tg.start_soon(view.follow, kv, stop)
            tg.start_soon(policy.follow, policy_kv, stop)
            tg.start_soon(tick)
            await outcomes.run(stop)
            tg.cancel_scope.cancel()
