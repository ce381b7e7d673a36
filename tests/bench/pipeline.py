"""The real pipeline: every service as an OS process, valid tasks from many users.

Each task goes submit -> guard -> budget -> executor -> worker -> executor and
ends in TaskCompleted; the clock runs from just before `client.submit` to the
terminal event arriving on the client's core subscription.
"""

from __future__ import annotations

import random
import uuid
from pathlib import Path

import anyio
import msgspec

from contracts import TaskSpec, subjects
from contracts.policy import BudgetLimits, Defaults, Policy, RateLimit
from services.client import TERMINAL, Client
from services.stack import Services
from shared.bus import Bus
from shared.config import Settings
from shared.policy import apply_policy
from tests.bench.common import (ISOLATED_ENV, WARMUP_IDLE_S, Measured, RunResult, drive, kv_writes, nats_server_pid,
                                sampled, warm_up_failed)

TENANTS = ("default", "acme", "globex", "initech")
AGENTS = ("research", "coding", "writing")
WARMUP_TASKS = 50  # untimed: loads tokenizers, creates KV keys, fills connection buffers
READY_TIMEOUT_S = 60.0

# No simulated latency or failures. (Budgets and rate limits are policy, not settings:
# `_apply_bench_policy` makes them never bind.)
SERVICE_ENV = {**ISOLATED_ENV, "CORRAL_SIM_LATENCY_S": "0", "CORRAL_SIM_FAILURE_RATE": "0"}


def workload(count: int, users: int, seed: int = 11) -> dict[str, tuple[str, str, TaskSpec]]:
    """task id -> (tenant, user, spec): valid tasks spread round-robin over `users` users."""
    rng = random.Random(seed)
    run = uuid.uuid4().hex[:8]
    plan = {}
    for n in range(count):
        user = n % users
        spec = TaskSpec(agent=rng.choice(AGENTS), prompt=f"Task {n}: summarise finding {rng.randrange(10**6)} "
                        f"for the weekly review, with sources and open risks.", max_tokens=128)
        plan[f"bench-{run}-{n:06d}"] = (TENANTS[user % len(TENANTS)], f"bench-user-{user:05d}", spec)
    return plan


def run(nats_url: str, log_dir: Path, tasks: int, users: int, concurrency: int, idle_timeout_s: float) -> Measured:
    """Start every service, drive `tasks` tasks, stop the services (always)."""
    anyio.run(_apply_bench_policy, nats_url, backend_options={"use_uvloop": True})
    services = Services(nats_url, log_dir, env=SERVICE_ENV)
    try:
        services.start()
        return anyio.run(_measure, services, tasks, users, concurrency, idle_timeout_s,
                         backend_options={"use_uvloop": True})
    finally:
        services.stop()


async def _apply_bench_policy(nats_url: str) -> None:
    """Rate limits and budgets that never bind, as the policy every service reads at start."""
    rate = RateLimit(requests_per_minute=1e9, tokens_per_minute=1e12, burst_requests=10**9, burst_tokens=10**12)
    budget = BudgetLimits(daily_tokens=10**12, hourly_tokens=10**12)
    policy = Policy(description="bench: limits that never bind",
                    defaults=Defaults(rate=rate, tenant_rate=rate, budget=budget, tenant_budget=budget))
    async with Bus.connect(Settings(nats_url=nats_url), "bench") as bus:
        await apply_policy(await bus.policy_bucket(), policy)


async def _measure(services: Services, tasks: int, users: int, concurrency: int,
                   idle_timeout_s: float) -> Measured:
    settings = Settings(nats_url=services.nats_url)
    async with Client.connect(settings, "bench") as client, client.events(ends_only=True) as events:
        await client.wait_ready(services.names(), timeout=READY_TIMEOUT_S)
        warm = await _drive(client, events, workload(WARMUP_TASKS, users), concurrency, WARMUP_IDLE_S)
        if warm_up_failed(warm):
            raise RuntimeError(f"no warm-up task finished; see the logs in {services.log_dir}")
        plan = workload(tasks, users)
        pids = {proc.name: proc.pid for proc in services.processes}
        server = nats_server_pid()
        writes_before, late_before = await anyio.to_thread.run_sync(kv_writes, server), await _late_steps(client)
        result, sampler, server_msgs = await sampled(
            pids, "", lambda: _drive(client, events, plan, concurrency, idle_timeout_s))
        writes_after, late_after = await anyio.to_thread.run_sync(kv_writes, server), await _late_steps(client)
        lost_status = {task_id: await _status(client, task_id) for task_id in result.lost_sample}
    return Measured(result=result, processes=sampler.stats(), other_cpu_s=sampler.other_cpu_s(),
                    server_msgs=server_msgs, crashed=[proc.name for proc in services.crashed()],
                    kv_writes={bucket: last - writes_before.get(bucket, 0) for bucket, last in writes_after.items()},
                    late_steps=None if late_before is None or late_after is None else late_after - late_before,
                    lost_status=lost_status)


async def _late_steps(client: Client) -> int | None:
    """The budget's count of steps posted after their task's release had begun (None if it does not answer)."""
    try:
        reply = await client.bus.nc.request(subjects.service_stats("budget"), b"", timeout=2.0)
        return msgspec.json.decode(reply.data).get("late_steps")
    except Exception:  # an older budget, or none: the bench still reports the rest
        return None


async def _status(client: Client, task_id: str) -> str:
    try:
        reply = await client.task_status(task_id, timeout=2.0)
    except Exception as exc:  # the executor may be the process that died
        return f"unknown ({type(exc).__name__})"
    return f"{reply.status} (attempt {reply.attempt})" if reply.found else "no record in the executor"


async def _drive(client: Client, events, plan: dict[str, tuple[str, str, TaskSpec]], concurrency: int,
                 idle_timeout_s: float) -> RunResult:
    async def publish(task_id: str) -> None:
        tenant, user, spec = plan[task_id]
        await client.submit(spec, tenant=tenant, user=user, task_id=task_id)

    async def receive() -> tuple[str, str] | None:
        event = await events.receive()
        if not isinstance(event, TERMINAL):
            return None
        outcome = type(event).__struct_config__.tag
        reason = getattr(event, "reason", "")  # rejected and failed say why
        return event.task_id, f"{outcome}: {reason}" if reason else outcome

    return await drive(list(plan), publish, receive, concurrency, idle_timeout_s)
