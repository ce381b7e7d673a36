"""monitor service: reads the task, step and breaker streams in order; answers status requests; polls queue
depths."""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import Union

import anyio
import anyio.abc
import msgspec
from nats.js.kv import KeyValue

from contracts import events as e
from contracts import subjects as s
from services.monitor import export, scrape
from services.monitor.alerting import AlertDesk
from services.monitor.handlers import Metrics
from services.monitor.otel import OtelMetrics
from services.monitor.snapshot import SnapshotStore, capture, restore
from services.monitor.webhooks import WebhookSender
from services.monitor.scaling import Backlog, Scaler
from shared.bus import Bus
from shared.config import Settings
from shared.consume import decoder_for
from shared.feed import StreamFeed
from shared.policy import PolicyView
from shared.quarantine import Quarantine
from shared.runtime import micro_service

NAME = "monitor"
# What the metrics need; progress and step requests are left on the server.
TASK_SUBJECTS = (s.ALL_VALIDATED, s.ALL_ADMITTED, s.ALL_REJECTED, s.ALL_COMPLETED, s.ALL_FAILED)
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


def feeds(bus: Bus, metrics: Metrics, positions: dict[str, int], live=None) -> list[StreamFeed]:
    """One ordered reader per stream, each from the sequence after `positions` (a snapshot's); `live` is told
    each step event after the replay."""
    wanted = [(s.STREAM_TASKS, TASK_SUBJECTS, Union[e.TASK_EVENTS]),
              (s.STREAM_STEPS, STEP_SUBJECTS, Union[e.STEP_EVENTS]),
              (s.STREAM_SIGNALS, (s.ALL_BREAKER,), e.BreakerChanged)]
    return [StreamFeed(bus, stream, subjects, decoder_for(contract), metrics.on_event, positions.get(stream, 0),
                       live=live if stream == s.STREAM_STEPS else None)
            for stream, subjects, contract in wanted]


class Monitor:
    """One replica's parts, restored from its snapshot, before anything runs."""

    def __init__(self, bus: Bus, settings: Settings, policy_kv: KeyValue, own_kv: KeyValue, policy: PolicyView,
                 quarantine: Quarantine) -> None:
        self.bus, self.settings, self.policy_kv = bus, settings, policy_kv
        self.policy, self.quarantine = policy, quarantine
        self.metrics = Metrics(policy, max_scopes=settings.monitor_max_scopes)
        self.store = SnapshotStore(own_kv, s.KV_MONITOR, quarantine)
        self.metrics.replica = self.store.writer
        self.webhooks = WebhookSender()
        self.desk = AlertDesk(bus, own_kv, policy_kv, policy, self.metrics, quarantine, self.webhooks)
        self.otel = OtelMetrics(self.metrics, settings.otlp_endpoint, settings.monitor_otlp_interval_s,
                                self.firing) if settings.otlp_endpoint else None
        self.readers: list[StreamFeed] = []
        self.served: dict[str, int] = {}  # the scrape endpoint's port, once it listens

    def firing(self):
        return self.desk.book.firing.values()

    async def restore(self) -> None:
        if (snapshot := await self.store.read()) is not None:
            restore(self.metrics, snapshot)
            self.desk.ran_before = True
        self.readers = feeds(self.bus, self.metrics, self.metrics.positions,
                             live=self.otel.record if self.otel else None)

    def start_background(self, tg: anyio.abc.TaskGroup, stop: anyio.Event) -> None:
        settings = self.settings
        tg.start_soon(self.policy.follow, self.policy_kv, stop)
        tg.start_soon(_poll_queue_depth, self.bus, self.metrics, self.policy, settings.monitor_poll_s, stop)
        tg.start_soon(_snapshot_every, self.store, self.metrics, settings.monitor_snapshot_s, stop)
        tg.start_soon(self.webhooks.run, stop)
        tg.start_soon(self.desk.run, stop)
        if settings.metrics_port >= 0:
            tg.start_soon(partial(scrape.serve, settings.metrics_host, settings.metrics_port,
                                  lambda: export.render(self.metrics, self.firing(), time.time()),
                                  export.CONTENT_TYPE, stop, bound=partial(self.served.__setitem__, "port")))

    async def status(self, _: bytes) -> bytes:
        return msgspec.json.encode(self.metrics.report())

    def endpoints(self) -> dict:
        return {"status": (s.MONITOR_STATUS, self.status), "alerts": (s.MONITOR_ALERTS, self.desk.alerts),
                "silence": (s.MONITOR_SILENCE, self.desk.silence)}

    def stats(self) -> dict:
        return {**{feed.name: feed.stats_dict() for feed in self.readers}, "policy": self.policy.stats(),
                "quarantined": self.quarantine.stats(), "snapshots": self.store.stats(),
                "alerts": self.desk.stats(), "metrics_port": self.served.get("port", -1)}


async def run(settings: Settings, stop: anyio.Event) -> None:
    async with Bus.connect(settings, NAME) as bus:
        policy_kv = await bus.policy_bucket()
        quarantine = Quarantine(bus.js, NAME)
        policy = await PolicyView.load(policy_kv, quarantine)
        monitor = Monitor(bus, settings, policy_kv, await bus.bucket(s.KV_MONITOR), policy, quarantine)
        await monitor.restore()
        async with anyio.create_task_group() as tg:
            for feed in monitor.readers:
                tg.start_soon(feed.run, stop)
            for feed in monitor.readers:  # answer pings (be "ready") only once what the streams held is folded in
                await feed.caught_up.wait()
            monitor.start_background(tg, stop)
            try:
                async with micro_service(bus, "metrics over every event, alerts", monitor.endpoints(),
                                         stats=monitor.stats):
                    await stop.wait()
            finally:
                if monitor.otel:
                    await anyio.to_thread.run_sync(monitor.otel.shutdown)


async def _snapshot_every(store: SnapshotStore, metrics: Metrics, every_s: float, stop: anyio.Event) -> None:
    """A snapshot every `every_s`, and a last one on the way out."""
    while True:
        with anyio.move_on_after(every_s):
            await stop.wait()
        with anyio.CancelScope(shield=stop.is_set()):
            try:
                await store.write(capture(metrics, store.generation(), time.time()))
            except Exception:  # noqa: BLE001 - the server is busy or away: the next round tries again
                log.exception("could not write the monitor's snapshot")
        if stop.is_set():
            return


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
