"""monitor service: observes the events as they are published; answers status requests; polls queue depths."""

from __future__ import annotations

import logging
from typing import Union

import anyio
import msgspec

from contracts import events as e
from contracts import subjects as s
from services.monitor.handlers import Metrics
from services.monitor.scaling import Backlog, Scaler
from shared.bus import Bus
from shared.config import Settings
from shared.consume import decoder_for
from shared.observe import Observer
from shared.policy import PolicyView
from shared.quarantine import Quarantine
from shared.runtime import micro_service

NAME = "monitor"
# What the metrics need; admissions, progress and step requests are left on the server.
TASK_SUBJECTS = (s.ALL_SUBMITTED, s.ALL_VALIDATED, s.ALL_REJECTED, s.ALL_COMPLETED, s.ALL_FAILED)
STEP_SUBJECTS = (s.ALL_STEP_COMPLETED, s.ALL_STEP_FAILED)
log = logging.getLogger(__name__)
WATCHED = [  # (stream, durable) whose backlog is the queue depth operators scale on
    (s.STREAM_INGRESS, s.CONSUMER_GUARD),
    (s.STREAM_TASKS, s.CONSUMER_BUDGET_ADMIT),
    (s.STREAM_TASKS, s.CONSUMER_EXECUTOR_TASKS),
    (s.STREAM_STEPS, s.CONSUMER_EXECUTOR_STEPS),
    (s.STREAM_STEPS, s.CONSUMER_BUDGET_USAGE),
    (s.STREAM_STEPS, s.CONSUMER_BREAKER),
]


async def run(settings: Settings, stop: anyio.Event) -> None:
    async with Bus.connect(settings, NAME) as bus:
        policy_kv = await bus.policy_bucket()
        quarantine = Quarantine(bus.js, NAME)
        policy = await PolicyView.load(policy_kv, quarantine)
        metrics = Metrics(policy)

        async def status(_: bytes) -> bytes:
            return msgspec.json.encode(metrics.report())

        observers = [
            Observer(bus, "tasks", TASK_SUBJECTS, decoder_for(Union[e.TASK_EVENTS]), metrics.on_event),
            Observer(bus, "steps", STEP_SUBJECTS, decoder_for(Union[e.STEP_EVENTS]), metrics.on_event),
            Observer(bus, "breakers", (s.ALL_BREAKER,), decoder_for(e.BreakerChanged), metrics.on_event),
        ]

        def stats() -> dict:
            return {**{observer.name: observer.stats_dict() for observer in observers}, "policy": policy.stats(),
                    "quarantined": quarantine.stats()}

        async with anyio.create_task_group() as tg:
            for observer in observers:
                tg.start_soon(observer.run, stop)
            for observer in observers:  # answer pings (be "ready") only once every event published is seen
                await observer.subscribed.wait()
            tg.start_soon(policy.follow, policy_kv, stop)
            tg.start_soon(_poll_queue_depth, bus, metrics, policy, settings.monitor_poll_s, stop)
            async with micro_service(bus, "metrics over every event", {"status": (s.MONITOR_STATUS, status)},
                                     stats=stats):
                await stop.wait()


async def _poll_queue_depth(bus: Bus, metrics: Metrics, policy: PolicyView, every_s: float,
                            stop: anyio.Event) -> None:
    scaler = Scaler()
    while not stop.is_set():
        workers = [(s.STREAM_STEPS, s.consumer_worker(agent)) for agent in policy().agents]
        backlogs = []
        for stream, durable in WATCHED + workers:
            try:
                info = await bus.js.consumer_info(stream, durable)
            except Exception:  # not created yet, or the server is busy: try again next round
                continue
            metrics.queue_depth[durable] = info.num_pending + info.num_ack_pending
            backlogs.append(Backlog(durable=durable, pending=info.num_pending or 0,
                                    ack_pending=info.num_ack_pending or 0,
                                    acked=info.ack_floor.consumer_seq if info.ack_floor else 0))
        await _advise(bus, scaler, backlogs, policy)
        with anyio.move_on_after(every_s):
            await stop.wait()


async def _advise(bus: Bus, scaler: Scaler, backlogs: list[Backlog], policy: PolicyView) -> None:
    """Publish each service's ScaleAdvice (services/monitor/scaling.py); a lost one is replaced next round."""
    for advice in scaler.advise(backlogs, policy().scaling):
        try:
            await bus.notify(s.scale_advice(advice.service), advice)
        except Exception as error:  # disconnected for a moment: the next round advises again
            log.warning("scale advice for %s not published: %r", advice.service, error)
