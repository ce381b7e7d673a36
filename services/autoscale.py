"""`corral up --autoscale`: the monitor's ScaleAdvice, acted on by starting and stopping local processes.

A thread listens for the advice (core NATS, `corral.scale.advice.<service>`) and keeps the newest per
service; `reconcile()`, called from `corral up`'s loop, starts or stops processes until each advised service
runs as many as advised. Only services this stack can start are scaled (the core ones and workers); the
monitor observes and is never scaled. Advice is bounded twice: by its own maximum, and by LOCAL_MAX on this
machine, so a forged or mistaken advice cannot start processes without end.
"""

from __future__ import annotations

import logging
import threading

import anyio
import msgspec

from contracts import subjects as s
from contracts.events import ScaleAdvice
from services.stack import CORE_SERVICES, Process, Services
from shared.bus import Bus
from shared.config import Settings

log = logging.getLogger(__name__)
LOCAL_MAX = 8
"""Most replicas of one service the local autoscaler runs, whatever the advice says."""
_advice = msgspec.json.Decoder(ScaleAdvice)


def process_args(service: str) -> tuple[str, str | None] | None:
    """(`corral service` name, agent) of a service label; None for one this stack does not scale."""
    if service.startswith(s.consumer_worker("")) and len(service) > len(s.consumer_worker("")):
        return "worker", service.removeprefix(s.consumer_worker(""))
    return (service, None) if service in CORE_SERVICES and service != "monitor" else None


class Autoscaler:
    def __init__(self, services: Services) -> None:
        self.services = services
        self.wanted: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self.listening = threading.Event()
        """Set once the subscription is in place."""
        self._thread: threading.Thread | None = None

    def on_advice(self, data: bytes) -> None:
        try:
            advice = _advice.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as error:
            log.warning("ignored a scale advice that does not decode: %s", error)
            return
        if process_args(advice.service) is None:
            return
        with self._lock:
            self.wanted[advice.service] = min(advice.replicas, advice.maximum, LOCAL_MAX)

    async def listen(self, settings: Settings) -> None:
        async with Bus.connect(settings, "autoscaler") as bus:

            async def on_msg(msg) -> None:
                self.on_advice(msg.data)

            await bus.nc.subscribe(s.ALL_SCALE_ADVICE, cb=on_msg)
            await bus.nc.flush()
            self.listening.set()
            while not self._stopped.is_set():
                await anyio.sleep(0.2)  # a thread's stop flag, not a synchronisation point

    def start(self, settings: Settings) -> None:
        """Listen in a thread of its own (the caller's loop is synchronous)."""
        self._thread = threading.Thread(target=anyio.run, args=(self.listen, settings), name="autoscaler",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread:
            self._thread.join(10)

    def running(self, service: str) -> list[Process]:
        return [proc for proc in self.services.processes if proc.name == service and proc.alive()]

    def reconcile(self) -> list[str]:
        """Start or stop processes to match the newest advice; what was done, one line each."""
        with self._lock:
            wanted = dict(self.wanted)
        done = []
        for service, replicas in sorted(wanted.items()):
            name, agent = process_args(service)
            running = self.running(service)
            for _ in range(replicas - len(running)):
                proc = self.services.start_one(name, agent=agent)
                done.append(f"autoscale: started {service} (pid {proc.pid}); {replicas} advised")
            for proc in reversed(running[replicas:]):
                proc.stop()  # SIGTERM: it finishes or leaves its messages, which others are redelivered
                self.services.processes.remove(proc)
                done.append(f"autoscale: stopped {service} (pid {proc.pid}); {replicas} advised")
        return done
