"""A restarted monitor does not start from zero: it resumes from its snapshot and replays the streams; a
poison snapshot is quarantined and the figures rebuilt; two replicas answer the same."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import anyio
import msgspec
import pytest

from contracts import TaskCompleted, subjects
from contracts.events import Usage
from contracts.queries import StatusReport
from services.client import Client
from tests.conftest import running, wait_until
from tests.test_poison import GARBAGE, dead_letters, service_stats

pytestmark = [pytest.mark.anyio, pytest.mark.integration]
ENCODER = msgspec.json.Encoder()


async def publish_ends(client: Client, tenant: str, first: int, count: int) -> None:
    """`count` tasks ended, each received a second before now: as the executor publishes them."""
    for n in range(first, first + count):
        end = TaskCompleted(task_id=f"durable-{n}", tenant=tenant, user="u", output="o", attempts=1, model="m-1",
                            usage=Usage(input_tokens=1, output_tokens=1),
                            received_at=datetime.now(UTC) - timedelta(seconds=1))
        await client.bus.js.publish(subjects.task_completed(tenant), ENCODER.encode(end))


async def completed_count(client: Client, count: int) -> StatusReport | None:
    report = await client.status()
    return report if report.counts.get("task.completed") == count else None


async def until_counted(client: Client, count: int) -> StatusReport:
    return await wait_until(lambda: completed_count(client, count), timeout=20)


async def monitor_ready(client: Client) -> None:
    await client.wait_ready({"corral-monitor"}, timeout=90)


async def test_a_restarted_monitor_resumes_from_its_snapshot_and_counts_what_happened_while_it_was_down(
        settings, tenant):
    async with Client.connect(settings, "test") as client:
        async with running(settings, "monitor"):
            await monitor_ready(client)
            await publish_ends(client, tenant, 0, 5)
            await until_counted(client, 5)
        await publish_ends(client, tenant, 5, 3)  # while no monitor runs
        async with running(settings, "monitor"):
            await monitor_ready(client)
            report = await until_counted(client, 8)
            stats = await service_stats(client, "monitor")
    assert report.latency.count == 8
    assert report.scopes[0].windows["5m"].tasks == 8
    assert stats["snapshots"]["restored_from"]  # it began from a snapshot ...
    assert stats[subjects.STREAM_TASKS]["replayed"] == 3  # ... and replayed only what came after it


async def test_a_snapshot_that_does_not_decode_is_quarantined_and_the_figures_rebuilt_from_the_streams(
        settings, tenant):
    async with Client.connect(settings, "test") as client:
        async with running(settings, "monitor"):
            await monitor_ready(client)
            await publish_ends(client, tenant, 0, 4)
            await until_counted(client, 4)
        kv = await client.bus.bucket(subjects.KV_MONITOR)
        revision = await kv.put("head", GARBAGE)
        async with running(settings, "monitor"):
            await monitor_ready(client)
            report = await until_counted(client, 4)
            stats = await service_stats(client, "monitor")
        letters = [letter for letter in await dead_letters(client.bus.js)
                   if letter.subject == f"$KV.{subjects.KV_MONITOR}.head"]
    assert report.latency.count == 4
    assert stats["snapshots"]["restored_from"] == ""
    assert stats["snapshots"]["refused"].startswith(f"head revision {revision}")
    assert stats["quarantined"]["buckets"][subjects.KV_MONITOR]["last_key"] == "head"
    assert [letter.payload for letter in letters] == [GARBAGE]


async def every_replicas_status(client: Client, replicas: int) -> list[StatusReport]:
    """One answer from each replica (the endpoint is a queue group: ask until each has answered)."""
    answers: dict[str, StatusReport] = {}
    with anyio.fail_after(10):
        while len(answers) < replicas:
            report = await client.status()
            answers[report.replica] = report
    return list(answers.values())


async def test_two_monitor_replicas_each_read_every_event_and_answer_the_same(settings, tenant):
    async with Client.connect(settings, "test") as client, running(settings, "monitor", "monitor"):
        await client.wait_ready({"corral-monitor"}, timeout=90)
        await publish_ends(client, tenant, 0, 12)

        async def both_counted():
            replies = await every_replicas_status(client, 2)
            return replies if all(r.counts.get("task.completed") == 12 for r in replies) else None

        first, second = await wait_until(both_counted, timeout=20)
    assert first.positions == second.positions
    assert [s.scope for s in first.scopes] == [s.scope for s in second.scopes] == ["all", f"tenant:{tenant}",
                                                                                  "model:m-1"]
    assert first.latency == second.latency and first.latency.count == 12
    assert first.scopes[1].windows["1h"] == second.scopes[1].windows["1h"]


@pytest.mark.fault
async def test_a_monitor_killed_between_snapshots_counts_every_event_once_after_its_restart(settings, tenant,
                                                                                             tmp_path):
    from tests.conftest import services

    procs = services(settings, tmp_path / "logs", env={"CORRAL_MONITOR_SNAPSHOT_S": "0.2"}, agents=())
    async with Client.connect(settings, "test") as client:
        try:
            first = procs.start_one("monitor")
            await monitor_ready(client)
            await publish_ends(client, tenant, 0, 6)
            await until_counted(client, 6)

            async def snapshotted():  # a snapshot that covers the six
                stats = await service_stats(client, "monitor")
                return stats["snapshots"]["written"] >= 2 and stats
            await wait_until(snapshotted, timeout=20)
            await publish_ends(client, tenant, 6, 4)  # folded in, and maybe not yet in a snapshot
            await until_counted(client, 10)
            first.popen.kill()  # SIGKILL: no last snapshot
            first.popen.wait()
            await publish_ends(client, tenant, 10, 2)
            procs.start_one("monitor")
            await monitor_ready(client)
            report = await until_counted(client, 12)
        finally:
            procs.stop()
    assert report.latency.count == 12
    assert report.counts["task.completed"] == 12
