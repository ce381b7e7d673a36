"""Processes die; tasks do not. SIGKILL in the middle of work loses nothing and bills once."""

from __future__ import annotations

import anyio
import msgspec
import pytest

from contracts import TaskCompleted, TaskProgress, TaskSpec, subjects
from services.budget.handlers import ledger_key
from services.budget.ledger import Ledger, day_window
from services.client import Client
from services.executor.state import step_id
from services.stack import Services
from tests.conftest import running

pytestmark = [pytest.mark.anyio, pytest.mark.integration, pytest.mark.fault]
QUIET_S = 3.0  # after the end, how long we watch for a duplicate (longer than the 2 s ack wait)


async def test_a_worker_killed_mid_step_still_completes_the_task_exactly_once_and_bills_once(
        settings, tenant, user, tmp_path):
    workers = Services(settings.nats_url, tmp_path / "logs", env={"CORRAL_ACK_WAIT_S": "2"})
    try:
        by_pid = {proc.pid: proc for proc in (workers.start_one("worker", agent="research") for _ in range(2))}
        async with running(settings, "guard", "budget", "executor"), \
                Client.connect(settings, "test") as client, client.events() as events:
            await client.wait_ready({"corral-guard", "corral-budget", "corral-executor", "corral-worker-research"})
            task_id = await client.submit(TaskSpec(agent="research", prompt="slow one [sim:latency=1.5]"),
                                          tenant=tenant, user=user)
            completions: list[TaskCompleted] = []
            killed = None
            with anyio.move_on_after(30):
                async for event in events:
                    if event.task_id != task_id:
                        continue
                    if isinstance(event, TaskProgress) and event.stage == "step_started" and killed is None:
                        killed = int(event.worker.rsplit("-", 1)[1])
                        by_pid[killed].kill()  # SIGKILL while the model call is under way
                    if isinstance(event, TaskCompleted):
                        completions.append(event)
                        break
            with anyio.move_on_after(QUIET_S):  # a real wait: would a second completion show up?
                async for event in events:
                    if isinstance(event, TaskCompleted) and event.task_id == task_id:
                        completions.append(event)
            kv = await client.bus.js.key_value(subjects.KV_BUDGET)
            entry = await kv.get(ledger_key(tenant, user, day_window(completions[0].occurred_at)))
            ledger = msgspec.json.decode(entry.value, type=Ledger)
    finally:
        workers.stop()
    assert killed is not None, "the step never started"
    assert len(completions) == 1
    assert ledger.committed == completions[0].usage.total
    assert list(ledger.posted) == [step_id(task_id, strategy=0, attempt=1)]
    assert ledger.reserved[task_id] == 0  # released at the end
