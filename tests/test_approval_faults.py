"""Approvals survive anything: the executor, the workers and the budget SIGKILLed while a task waits (and, in
one test, the nats-server restarted on its file store too), started again, then the approval: the approved call
runs once, the task completes once, every step is billed once. Real processes, a real server."""

from __future__ import annotations

from pathlib import Path

import pytest

from contracts import TaskCompleted
from contracts.approvals import Approval
from services import auth
from services.client import Client
from services.stack import Services
from shared.config import Settings
from tests.conftest import HARNESS, apply, services, wait_until
from tests.test_approval_gates import decide, gated_policy, pay, site, waiting_approval  # noqa: F401 (fixture)
from tests.test_budget import settled
from tests.test_orchestration_faults import stored
from tests.test_watches import RestartableServer

pytestmark = [pytest.mark.anyio, pytest.mark.integration, pytest.mark.fault]
ENV = {"CORRAL_ACK_WAIT_S": "2"}
KILLED = ("executor", "budget", "worker")
READY = {"corral-guard", "corral-budget", "corral-executor", "corral-breaker", "corral-approvals",
         "corral-worker-research"}


def start(stack: Services, *names: str) -> dict:
    return {name: stack.start_one(name, agent="research") if name == "worker" else stack.start_one(name)
            for name in names}


async def waiting_task(settings: Settings, site, stack: Services, tenant: str, user: str) -> tuple[str, Approval]:
    """Every service as a process, and a task of theirs waiting for approval."""
    await apply(settings, gated_policy(site))
    start(stack, "guard", "breaker", "approvals", *KILLED)
    async with Client.connect(settings, "test") as client:
        await client.wait_ready(READY, timeout=90)
        task_id = await client.submit(pay(site), tenant=tenant, user=user)
        return task_id, await waiting_approval(client, task_id, tenant)


async def approve_and_count(settings: Settings, site, task_id: str, approval: Approval, tenant: str):
    """Approve (twice, as a retrying client would), wait for the end; what the streams and the budget hold."""
    async with Client.connect(settings, "test") as client:
        await client.wait_ready(READY, timeout=90)
        for _ in range(2):
            reply = await client.decide_approval(decide(approval, "approve"), reviewer="alice")
            assert reply.ok, reply.message

        async def ended():
            status = await client.task_status(task_id, tenant=tenant)
            return status if status.status in ("completed", "failed") else None

        await wait_until(ended, timeout=60)
        held = await stored(client, task_id)
        cost = await wait_until(lambda: settled(client, task_id, held.ends[0].usage.total, tenant), timeout=30)
    return held, cost


def assert_once(held, cost, site) -> None:
    assert len(held.ends) == 1 and isinstance(held.ends[0], TaskCompleted), held.ends
    assert site.hits == 1  # the approved call ran once
    gated, resumed = held.requested
    assert resumed.step_id == f"{gated.step_id}=r1" and resumed.resume is not None
    assert sorted(step.step_id for step in cost.steps) == sorted([gated.step_id, resumed.step_id])
    assert cost.tokens == sum(step.usage.total for step in held.completed)  # each step billed once


async def test_executor_workers_budget_and_approvals_killed_while_a_task_waits_then_approved_complete_it_once(
        settings, site, tenant, user, tmp_path):
    stack = services(settings, tmp_path / "logs", env=ENV)
    try:
        task_id, approval = await waiting_task(settings, site, stack, tenant, user)
        for proc in list(stack.processes):
            if proc.name in ("executor", "budget", "worker-research", "approvals"):
                proc.kill()  # SIGKILL while the task waits
        start(stack, *KILLED, "approvals")
        held, cost = await approve_and_count(settings, site, task_id, approval, tenant)
    finally:
        stack.stop()
    assert_once(held, cost, site)


async def test_the_nats_server_restarted_on_its_store_while_a_task_waits_loses_nothing(
        site, tenant, user, tmp_path, auth_dir: Path):
    server = RestartableServer(tmp_path / "nats", auth_dir / auth.SERVER_CONFIG)
    await server.start()
    settings = Settings(nats_url=server.url, nats_credentials=str(auth_dir.parent / HARNESS), ack_wait_s=2.0)
    stack = Services(server.url, tmp_path / "logs", env=ENV, auth_dir=auth_dir)
    try:
        task_id, approval = await waiting_task(settings, site, stack, tenant, user)
        for proc in list(stack.processes):
            if proc.name in ("executor", "budget", "worker-research"):
                proc.kill()
        await server.stop()
        await server.start()
        start(stack, *KILLED)
        held, cost = await approve_and_count(settings, site, task_id, approval, tenant)
    finally:
        stack.stop()
        await server.stop()
    assert_once(held, cost, site)


async def test_a_worker_killed_during_the_approved_call_does_not_make_it_twice(
        settings, tenant, user, tmp_path):
    import threading

    from tests.test_tools import Site, answer

    arrived, release = threading.Event(), threading.Event()

    def pay(handler) -> None:  # the side effect happens, and the answer waits until the worker is gone
        arrived.set()
        release.wait(30)
        answer(handler, 200, b"paid")

    slow = Site({"/pay": pay})
    slow.thread.start()
    stack = services(settings, tmp_path / "logs", env=ENV)
    try:
        task_id, approval = await waiting_task(settings, slow, stack, tenant, user)
        async with Client.connect(settings, "test") as client:
            await client.decide_approval(decide(approval, "approve"), reviewer="alice")
            await wait_until(lambda: _set(arrived), timeout=30)
            next(proc for proc in stack.processes if proc.name == "worker-research" and proc.alive()).kill()
            release.set()
            start(stack, "worker")
            held, cost = await approve_and_count(settings, slow, task_id, approval, tenant)
    finally:
        stack.stop()
        slow.shutdown()
        slow.server_close()
    assert len(held.ends) == 1 and isinstance(held.ends[0], TaskCompleted), held.ends
    assert slow.hits == 1  # not made again by the worker the step went to next
    resumed = [r for r in held.requested if r.resume is not None]
    assert len(resumed) == 1  # the same resumed step, delivered again; the executor asked once


async def _set(event) -> bool:
    return event.is_set()
