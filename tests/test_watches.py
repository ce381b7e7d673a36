"""KV watches recover with the server: after a nats-server restart (same port, same store) every service sees a
new policy and a forced-open breaker within a second of reconnecting; a watch whose consumer is lost resumes
after the last revision it applied, missing nothing and applying nothing twice."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import msgspec
import pytest

from contracts import TaskCompleted, TaskSpec
from contracts.commands import ControlBreaker
from services.client import Client
from services import auth
from services.stack import free_port, nats_server
from shared.bus import Bus
from shared.config import Settings
from shared.policy import apply_policy
from shared.watch import SILENT_S, Watch
from tests.conftest import HARNESS, stack, wait_until
from tests.signals import example_policy

pytestmark = [pytest.mark.anyio, pytest.mark.integration]
LARGE = "simulated/sim-large"
POLICY_READERS = ("guard", "budget", "executor", "breaker", "monitor")
BREAKER_READERS = ("executor", "breaker", "worker-research", "worker-coding", "worker-writing")
RECOVERY_S = 1.0


class RestartableServer:
    """A nats-server that can be stopped and started again on the same port with the same store."""

    def __init__(self, data_dir: Path, config: Path) -> None:
        self.data_dir, self.config, self.port = data_dir, config, free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self._running = None

    async def start(self) -> None:
        running = nats_server(self.data_dir, self.port, config=self.config)
        await anyio.to_thread.run_sync(running.__enter__)  # it waits for "Server is ready": off the event loop
        self._running = running

    async def stop(self) -> None:
        running, self._running = self._running, None
        if running is not None:
            await anyio.to_thread.run_sync(running.__exit__, None, None, None)


async def _stats(client: Client, service: str) -> list[dict]:
    return [reply["endpoints"][0]["data"] for reply in await client.replica_stats(f"corral-{service}", gather_s=0.1)]


async def _when_every_service_saw(client: Client, version: int) -> float | None:
    """The unix time by which every policy reader ran `version` and every breaker reader saw LARGE forced
    open (each replica's stats say when it switched); None while one has not."""
    seen = []
    for service in POLICY_READERS:
        policies = [data["policy"] for data in await _stats(client, service)]
        if not policies or any(p["version"] != version for p in policies):
            return None
        seen += [p["since"] for p in policies]
    for service in BREAKER_READERS:
        views = [data["breakers"].get(LARGE, {}) for data in await _stats(client, service)]
        if not views or any((v.get("state"), v.get("forced")) != ("open", True) for v in views):
            return None
        seen += [v["seen_at"] for v in views]
    return max(seen)


@pytest.mark.fault
async def test_after_a_nats_server_restart_every_service_sees_a_new_policy_and_a_forced_breaker_within_a_second(
        tmp_path, auth_dir, tenant, user):
    server = RestartableServer(tmp_path / "nats", auth_dir / auth.SERVER_CONFIG)
    await server.start()
    settings = Settings(nats_url=server.url, nats_credentials=str(auth_dir.parent / HARNESS), sim_latency_s=0.0,
                        ack_wait_s=2.0)
    try:
        async with stack(settings, policy=example_policy()) as client:
            names = {f"corral-{name}" for name in (*POLICY_READERS, *BREAKER_READERS)}
            await server.stop()
            await server.start()
            ready = time.time()
            await client.wait_ready(names)  # every service is connected again
            reconnected = time.time()
            version = await apply_policy(await client.bus.policy_bucket(), example_policy(description="after"))
            await client.control_breaker(ControlBreaker(dependency=LARGE, action="force_open", operator="test"))
            seen = await wait_until(lambda: _when_every_service_saw(client, version), timeout=30)
            end = await client.run(TaskSpec(agent="research", prompt="After the restart"), tenant=tenant, user=user)
    finally:
        await server.stop()
    figures = (f"every service saw both {seen - reconnected:.2f} s after they had all reconnected (at most "
               f"{RECOVERY_S:g}), {seen - ready:.2f} s after the server was ready again")
    assert seen - reconnected < RECOVERY_S, figures
    assert isinstance(end, TaskCompleted) and end.tier == "fast", end  # the forced-open model was not called


async def test_a_watch_whose_consumer_is_lost_resumes_after_the_last_revision_missing_nothing_and_repeating_nothing(
        settings):
    async with Bus.connect(settings, "test-watch") as bus:
        kv = await bus.bucket("test_watch_resume", history=10)  # every change stays to be seen
        await kv.put("a", b"1")
        seen: list[tuple[str, bytes | None, int]] = []
        watch = Watch(kv, lambda key, value, revision: seen.append((key, value, revision)))
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch.run, stop)
            with anyio.fail_after(5):
                await watch.live.wait()
            for consumer in await bus.js.consumers_info("KV_test_watch_resume"):  # the server forgets it
                await bus.js.delete_consumer("KV_test_watch_resume", consumer.name)
            lost = time.monotonic()
            await kv.put("b", b"2")  # changes the watch cannot see yet
            await kv.put("a", b"3")
            await kv.delete("b")

            async def all_four():
                return len(seen) >= 4

            await wait_until(all_four, timeout=4 * SILENT_S)
            recovered = time.monotonic() - lost
            stop.set()
    assert seen == [("a", b"1", 1), ("b", b"2", 2), ("a", b"3", 3), ("b", None, 4)]
    assert watch.stats.restarts == 1
    assert recovered < SILENT_S + 2, f"recovered {recovered:.2f} s after the consumer was deleted"


async def test_a_watched_value_that_does_not_decode_is_quarantined_and_the_watch_goes_on(settings):
    async with Bus.connect(settings, "test-watch") as bus:
        kv = await bus.bucket("test_watch_poison")
        await kv.put("bad", b"{nope")
        await kv.put("good", b'{"n": 1}')
        decode = msgspec.json.Decoder(dict).decode
        seen: dict[str, dict] = {}
        watch = Watch(kv, lambda key, value, revision: seen.__setitem__(key, decode(value)))
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch.run, stop)
            with anyio.fail_after(5):
                await watch.live.wait()
            stop.set()
    assert seen == {"good": {"n": 1}}
    counted = watch.quarantine.counts["test_watch_poison"]
    assert (counted.values, counted.last_key, counted.last_revision) == (1, "bad", 1)

