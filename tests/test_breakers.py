"""Shared circuit breakers on a real nats-server: trips seen by every replica, half-open probes leased across
replicas, a broken tool that fails only its tasks, and operators forcing and releasing circuits."""

from __future__ import annotations

import os
import sys
import time

import anyio
import pytest

from contracts import BreakerChanged, StepFailed, StepRequested, TaskCompleted, TaskFailed, TaskSpec
from contracts.commands import SimulateDependency
from contracts.policy import AgentPolicy, BreakerSettings, Strategy
from services.client import Client
from services.stack import nats_server
from tests.conftest import operator_env, stack, wait_until
from tests.signals import example_policy, replica_views, signals

pytestmark = [pytest.mark.anyio, pytest.mark.integration]
LARGE = "simulated/sim-large"
TOOL = "tool/code_interpreter"
THREE_EXECUTORS = ("guard", "budget", "executor", "executor", "executor", "breaker", "worker:research")
CHAIN = [Strategy(model="sim-large", tier="advanced", max_attempts=1, timeout_s=30),
         Strategy(model="sim-small", tier="fast", timeout_s=10)]
HELD_S = 20.0
"""A held call's latency: the test lets it go (a new simulation command) long before, and before the step's timeout."""


def large_breaker(**rules) -> object:
    return example_policy(agents={"research": AgentPolicy(chain=CHAIN)},
                          breaker_overrides={LARGE: BreakerSettings(**rules)})


async def replicas(client: Client, service: str, count: int) -> None:
    await wait_until(lambda: _enough(client, service, count), timeout=20)


async def _enough(client: Client, service: str, count: int) -> bool:
    return (await client.running_services()).get(service, 0) >= count


async def submit(client: Client, n: int, user: str, tenant: str, prompt: str = "Research it", **spec) -> list[str]:
    return [await client.submit(TaskSpec(agent=spec.pop("agent", "research"), prompt=f"{prompt} #{i}", **spec),
                                tenant=tenant, user=user) for i in range(n)]


async def ends(events, ids: list[str], timeout: float = 30.0, count: int | None = None) -> dict[str, object]:
    """The terminal event of each task id (of the first `count` to end), as they arrive."""
    wanted, done = set(ids), {}
    with anyio.fail_after(timeout):
        async for event in events:
            if event.task_id in wanted and isinstance(event, (TaskCompleted, TaskFailed)):
                done[event.task_id] = event
                if len(done) == (len(wanted) if count is None else count):
                    return done
    raise AssertionError("event stream ended")


async def test_a_failing_dependency_trips_the_breaker_and_three_executor_replicas_all_stop_calling_it_within_a_second(
        settings, tenant, user):
    policy = large_breaker(window_size=4, minimum_calls=4, wait_in_open_s=60)
    async with stack(settings, *THREE_EXECUTORS, policy=policy) as client, signals(client) as heard, \
            client.events() as events:
        await replicas(client, "corral-executor", 3)
        await client.simulate(SimulateDependency(dependency=LARGE, mode="fail"), expect=1)
        first = await ends(events, await submit(client, 8, user, tenant))
        opened = await heard.first(BreakerChanged, dependency=LARGE, state="open")
        tripping = heard.of(StepFailed, dependency=LARGE)[3]  # the breaker counts in stream order: the 4th trips it

        async def every_replica_sees_it_open():
            views = await replica_views(client, "corral-executor", LARGE, expect=3)
            return views if len(views) == 3 and all(v.get("state") == "open" for v in views) else None

        views = await wait_until(every_replica_sees_it_open)
        last_seen = max(view["seen_at"] for view in views)
        later = await ends(events, await submit(client, 6, user, tenant, prompt="After the trip"))
        # the tasks sent once every replica saw it open; a step stamped after last_seen proves nothing: it is
        # stamped after its record's write, so it may have been decided just before its replica saw the change
        calls_after = [e for e in heard.of(StepRequested, model="sim-large") if e.task_id in later]
    assert all(isinstance(e, TaskCompleted) for e in [*first.values(), *later.values()])
    assert (opened.previous, opened.failure_rate, opened.calls) == ("closed", 100.0, 4)
    assert last_seen - tripping.occurred_at.timestamp() < 1.0  # failure -> breaker -> KV -> the last replica's view
    assert calls_after == []
    assert {(e.tier, e.attempts) for e in later.values()} == {("fast", 1)}  # straight to the fast tier: one step


@pytest.mark.parametrize("probes_succeed", [True, False], ids=["success closes it", "failure reopens it"])
async def test_half_open_admits_exactly_the_permitted_probes_across_three_executor_replicas(
        settings, tenant, user, probes_succeed):
    policy = large_breaker(window_size=3, minimum_calls=3, failure_rate_threshold=50, wait_in_open_s=1.0,
                           permitted_calls_in_half_open=2)
    async with stack(settings, *THREE_EXECUTORS, policy=policy) as client, signals(client) as heard, \
            client.events() as events:
        await replicas(client, "corral-executor", 3)
        await client.simulate(SimulateDependency(dependency=LARGE, mode="fail"), expect=1)
        await ends(events, await submit(client, 3, user, tenant))
        await heard.first(BreakerChanged, dependency=LARGE, state="open")
        # The probes' calls are held until every other task has ended, so all twelve tasks are decided while
        # the circuit is half-open, however long they take to get there.
        mode = "slow" if probes_succeed else "fail"
        await client.simulate(SimulateDependency(dependency=LARGE, mode=mode, latency_s=HELD_S), expect=1)
        half_open = await heard.first(BreakerChanged, dependency=LARGE, state="half_open")
        ids = await submit(client, 12, user, tenant, prompt="While half-open")
        done = await ends(events, ids, count=10)  # the ten that were refused a probe
        await client.simulate(SimulateDependency(dependency=LARGE, mode="recover"), expect=1)  # the probes' calls end
        done |= await ends(events, [i for i in ids if i not in done])
        settled = await heard.first(BreakerChanged, dependency=LARGE, generation=half_open.generation + 1)
    window = (half_open.occurred_at, settled.occurred_at)
    # distinct steps: an executor republishes a step when its task's admission comes again (a late ack)
    probes = {e.step_id for e in heard.of(StepRequested, model="sim-large") if window[0] <= e.occurred_at < window[1]}
    assert len(probes) == 2
    assert settled.state == ("closed" if probes_succeed else "open")
    assert settled.reason.startswith("probes:")
    tiers = sorted(e.tier for e in done.values())
    assert tiers == (["advanced"] * 2 + ["fast"] * 10 if probes_succeed else ["fast"] * 12)


async def _healthy_rate_and_ends(client: Client, events, user: str, tenant: str) -> tuple[float, dict, dict]:
    """Submit 10 research, 10 writing and 10 coding tasks (coding needs the code interpreter) at 40/s; return the
    healthy tasks' completions per second, and the ends of the healthy and of the coding tasks."""
    healthy, coding = [], []
    started = time.time()
    for n in range(30):
        kind = ("research", "writing", "coding")[n % 3]
        spec = TaskSpec(agent=kind, prompt=f"Work item {n}", tools=["code_interpreter"] if kind == "coding" else [])
        (coding if kind == "coding" else healthy).append(await client.submit(spec, tenant=tenant, user=user))
        await anyio.sleep(max(0.0, started + (n + 1) / 40 - time.time()))  # pacing the load, not a sync point
    done = await ends(events, healthy + coding)
    healthy_ends = {i: done[i] for i in healthy}
    last = max(e.occurred_at.timestamp() for e in healthy_ends.values())
    return len(healthy) / (last - started), healthy_ends, {i: done[i] for i in coding}


async def test_a_broken_tool_fails_only_the_tasks_that_need_it_and_other_agents_keep_completing_at_the_same_rate(
        settings, tenant, user, tmp_path):
    policy = example_policy(breaker_overrides={TOOL: BreakerSettings(window_size=4, minimum_calls=4)})
    # The same load at the same time on a second stack whose tool works: whatever else the machine is doing
    # slows both alike, so the healthy agents' rates compare (one stack before and during would not).
    with nats_server(tmp_path / "working") as working_url:
        async with stack(settings, policy=policy) as client, signals(client) as heard, client.events() as events, \
                stack(settings.with_changes(nats_url=working_url), policy=policy) as other, \
                other.events() as other_events:
            await client.simulate(SimulateDependency(dependency=TOOL, mode="fail"), expect=3)
            measured = {}

            async def measure(name: str, on: Client, its_events) -> None:
                measured[name] = await _healthy_rate_and_ends(on, its_events, user, tenant)

            async with anyio.create_task_group() as tg:
                tg.start_soon(measure, "broken", client, events)
                tg.start_soon(measure, "working", other, other_events)
            opened = await heard.first(BreakerChanged, dependency=TOOL, state="open")
    during, healthy_during, coding_during = measured["broken"]
    working, healthy_working, coding_working = measured["working"]
    assert all(isinstance(e, TaskCompleted) for e in [*healthy_working.values(), *coding_working.values(),
                                                       *healthy_during.values()])
    assert all(isinstance(e, TaskFailed) for e in coding_during.values())
    assert {e.reason for e in coding_during.values()} <= {"attempts_exhausted", "breaker_open"}
    assert "breaker_open" in {e.reason for e in coding_during.values()}  # once open, the rest failed fast
    assert all(a.dependency == TOOL for e in coding_during.values() for a in e.attempts)
    assert opened.previous == "closed"
    assert during >= 0.6 * working, (working, during)  # healthy agents' throughput held up


async def _corral(settings, *args: str) -> str:
    done = await anyio.run_process([sys.executable, "-m", "services.cli", *args, "--nats", settings.nats_url],
                                   check=False, env={**os.environ, **operator_env(settings), "COLUMNS": "200"})
    out = done.stdout.decode()
    assert done.returncode == 0, out + done.stderr.decode()
    return out


async def test_an_operator_forces_a_breaker_open_it_holds_until_released_and_corral_breakers_shows_it(
        settings, tenant, user):
    async with stack(settings, policy=example_policy()) as client:
        said = await _corral(settings, "breakers", "force-open", LARGE)
        await wait_until(lambda: _every_replica_sees(client, {"state": "open", "forced": True}))
        while_forced = await client.run(TaskSpec(agent="research", prompt="Not on the big one"), tenant=tenant,
                                        user=user)
        listing = await _corral(settings, "breakers")
        await _corral(settings, "breakers", "release", LARGE)
        await wait_until(lambda: _every_replica_sees(client, {"state": "closed", "forced": False}))
        after = await client.run(TaskSpec(agent="research", prompt="Back on the big one"), tenant=tenant, user=user)
        status = await client.task_status(while_forced.task_id)
    assert "open (forced)" in said
    assert isinstance(while_forced, TaskCompleted) and while_forced.tier == "fast"
    assert [(a.dependency, a.called) for a in status.attempts] == [(LARGE, False)]
    row = next(line for line in listing.splitlines() if LARGE in line)
    assert "open (forced)" in row and "forced open by" in row
    assert isinstance(after, TaskCompleted) and after.tier == "advanced"


async def _every_replica_sees(client: Client, expected: dict) -> bool:
    """Every executor and research worker (each gates its calls on its own view) sees `expected`."""
    for service in ("corral-executor", "corral-worker-research"):
        views = await replica_views(client, service, LARGE, expect=1)
        if not views or any({k: v.get(k) for k in expected} != expected for v in views):
            return False
    return True
