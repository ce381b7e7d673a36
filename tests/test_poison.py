"""State that does not decode is quarantined, not fatal: a bad value in any bucket is reported once, with its
key, and every service keeps serving; a bad policy is refused and the last good one kept."""

from __future__ import annotations

from types import SimpleNamespace

import anyio
import msgspec
import pytest

from contracts import DeadLetter, StepRequested, TaskAdmitted, TaskCompleted, TaskFailed, TaskProgress, TaskSpec
from contracts import subjects as s
from contracts.events import task_ref
from contracts.policy import AgentPolicy, Strategy
from services.budget.handlers import user_key
from services.client import Client
from services.executor.state import cache_key
from shared.bus import Bus
from shared.policy import apply_policy, rollback
from tests.conftest import apply, stack, wait_until
from tests.signals import example_policy, signals

pytestmark = [pytest.mark.anyio, pytest.mark.integration]
GARBAGE = b"\x00not json {"
POLICY_READERS = ("guard", "budget", "executor", "breaker", "monitor")
CACHED_FIRST = [Strategy(kind="cache", tier="cached"), Strategy(model="sim-small", tier="fast", timeout_s=10)]


def cached_first_policy():
    """The example policy, with writing tasks asking the cache first: a normal task reads the cache."""
    policy = example_policy()
    return msgspec.structs.replace(policy, agents={**policy.agents, "writing": AgentPolicy(chain=CACHED_FIRST)})


def poisoned_keys(tenant: str, user: str, spec: TaskSpec) -> dict[str, tuple[str, str]]:
    """bucket -> (the key a normal task of `user` touches, the service that owns the bucket)."""
    return {
        s.KV_TASKS: (task_ref(tenant, "t-poisoned"), "executor"),  # a task no one runs: only the executor's sweep sees it
        s.KV_BUDGET: (user_key(tenant, user), "budget"),
        s.KV_BREAKERS: ("simulated/sim-small", "breaker"),
        s.KV_RATES: (f"user.{tenant}.{user}", "guard"),
        s.KV_CACHE: (cache_key(SimpleNamespace(tenant=tenant, spec=spec)), "executor"),
    }


async def poison(bus: Bus, buckets: dict[str, tuple[str, str]]) -> dict[str, int]:
    """Write GARBAGE as the value of each key; the revision each got, by bucket (the policy's too)."""
    revisions = {bucket: await (await bus.bucket(bucket)).put(key, GARBAGE) for bucket, (key, _) in buckets.items()}
    revisions[s.KV_POLICY] = await (await bus.policy_bucket()).put("current", GARBAGE)
    return revisions


async def dead_letters(js) -> list[DeadLetter]:
    info = await js.stream_info(s.STREAM_DLQ)
    letters = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        raw = await js.get_msg(s.STREAM_DLQ, seq)
        letters.append(msgspec.json.decode(raw.data, type=DeadLetter))
    return letters


async def service_stats(client: Client, service: str) -> dict:
    replies = await client.replica_stats(f"corral-{service}", gather_s=0.1)
    return replies[0]["endpoints"][0]["data"] if replies else {}


@pytest.mark.parametrize("when", ["before the services start", "while they run"])
async def test_a_value_that_does_not_decode_in_any_bucket_is_reported_once_with_its_key_and_every_service_keeps_serving(
        settings, tenant, user, when):
    spec = TaskSpec(agent="writing", prompt="Still serving?")
    buckets = poisoned_keys(tenant, user, spec)
    good = await apply(settings, cached_first_policy())
    async with Bus.connect(settings, "test-poison") as bus:
        revisions = await poison(bus, buckets) if when == "before the services start" else {}
        async with stack(settings) as client:
            revisions = revisions or await poison(bus, buckets)
            end = await client.run(spec, tenant=tenant, user=user)

            async def every_value_reported():
                letters = [l for l in await dead_letters(bus.js) if l.subject.startswith("$KV.")]
                stats = {name: await service_stats(client, name) for name in POLICY_READERS}
                counted = all(bucket in stats[owner]["quarantined"]["buckets"] for bucket, (_, owner) in buckets.items())
                refused = all(stats[name]["policy"]["refused"] for name in POLICY_READERS)
                return (letters, stats) if len(letters) >= len(revisions) and counted and refused else None

            letters, stats = await wait_until(every_value_reported)
    assert isinstance(end, TaskCompleted), end
    assert end.dependency == "simulated/sim-small"  # the cache missed (its value was bad), the model answered
    reported = sorted((l.subject, l.payload) for l in letters)
    expected = [(f"$KV.{bucket}.{key}", GARBAGE) for bucket, (key, _) in buckets.items()]
    assert reported == sorted([*expected, (f"$KV.{s.KV_POLICY}.current", GARBAGE)])  # once each, by one service
    assert all(f"revision {revisions[l.subject.split('.')[1]]} does not decode" in l.reason for l in letters)
    for bucket, (key, owner) in buckets.items():
        counted = stats[owner]["quarantined"]["buckets"].get(bucket, {})
        assert counted.get("last_key") == key, (bucket, owner, stats[owner]["quarantined"])
    for name in POLICY_READERS:  # each refused the bad version and kept the good one
        assert stats[name]["policy"]["version"] == good, (name, stats[name]["policy"])
        assert stats[name]["policy"]["refused"]["version"] == revisions[s.KV_POLICY], (name, stats[name]["policy"])


async def test_a_running_tasks_record_that_does_not_decode_fails_the_task_once_and_it_never_runs_again(
        settings, tenant, user):
    async with stack(settings, policy=example_policy()) as client, client.events() as events, \
            signals(client) as heard:
        tasks = await client.bus.bucket(s.KV_TASKS)
        task_id = await client.submit(TaskSpec(agent="writing", prompt="slow one [sim:latency=1]"), tenant=tenant,
                                      user=user)
        ends, admitted = [], None
        with anyio.fail_after(30):
            async for event in events:
                if event.task_id != task_id:
                    continue
                if isinstance(event, TaskAdmitted):
                    admitted = event
                if isinstance(event, TaskProgress) and event.stage == "step_started":
                    await tasks.put(task_ref(tenant, task_id), GARBAGE)  # while the worker is on its step
                if isinstance(event, (TaskCompleted, TaskFailed)):
                    ends.append(event)
                    break
        first = await tasks.put(task_ref(tenant, task_id), GARBAGE)  # and once more, then the admission comes again
        await client.bus.js.publish(s.task_admitted(tenant), msgspec.json.encode(admitted),
                                    headers={s.HEADER_MSG_ID: f"again-{task_id}"})

        async def record_replaced():
            entry = await tasks.get(task_ref(tenant, task_id))
            return entry.revision > first

        await wait_until(record_replaced)
        later = []
        with anyio.move_on_after(3.0):  # a real wait: would a step or a completion show up?
            async for event in events:
                if event.task_id == task_id and isinstance(event, (TaskCompleted, TaskProgress)):
                    later.append(event)
        status = await client.task_status(task_id)
        budget = await wait_until(lambda: _released(client, tenant, user))
    assert [type(e) for e in ends] == [TaskFailed]
    assert ends[0].reason == "permanent_error" and "does not decode" in ends[0].error
    assert later == [] and len(heard.of(StepRequested, task_id=task_id)) == 1  # the one step, before the loss
    assert (status.found, status.status) == (True, "failed")
    assert budget.open_tasks == 0  # its reservation was released


async def _released(client: Client, tenant: str, user: str):
    shown = await client.budget(tenant, user)
    return shown if shown.open_tasks == 0 else None


async def test_a_rollback_from_a_version_that_does_not_decode_returns_to_the_last_good_one(settings):
    first, second = example_policy(description="first"), example_policy(description="second")
    async with Bus.connect(settings, "test-policy") as bus:
        kv = await bus.policy_bucket()
        await apply_policy(kv, first)
        await apply_policy(kv, second)
        await kv.put("current", GARBAGE)
        version = await rollback(kv)
        entry = await kv.get("current")
    assert entry.revision == version
    assert msgspec.json.decode(entry.value)["description"] == "second"
