"""agent worker service: one process per agent kind; start more to scale that kind."""

from __future__ import annotations

import os
import socket

import anyio

from contracts import StepRequested
from contracts import subjects as s
from services.workers.handlers import Worker
from services.workers.simulated import SimulatedProvider
from shared.bus import Bus
from shared.config import Settings
from shared.consume import Consumer, decoder_for
from shared.runtime import micro_service
from shared.streams import consumer_config


def name(agent: str) -> str:
    return f"worker-{agent}"


async def run(settings: Settings, stop: anyio.Event, agent: str) -> None:
    provider = SimulatedProvider(latency_s=settings.sim_latency_s, failure_rate=settings.sim_failure_rate)
    async with Bus.connect(settings, name(agent)) as bus, micro_service(bus, f"{agent} agent worker"):
        worker = Worker(f"{socket.gethostname()}-{os.getpid()}", {provider.name: provider}, bus.emit)
        steps = Consumer(bus, s.STREAM_STEPS,
                         consumer_config(settings, s.consumer_worker(agent), s.step_requested(agent)),
                         decoder_for(StepRequested), worker.on_step, long_running=True)
        await steps.run(stop)
