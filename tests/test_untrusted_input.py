"""Untrusted publishers cannot break, fool or bypass Corral: on a real nats-server, each way a publisher
could send nonsense, impersonate another tenant, collide with internal ids or skew the figures, and what
Corral does instead."""

from __future__ import annotations

import hashlib
import random
from datetime import UTC, datetime, timedelta
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Union

import msgspec
import nats
import pytest
from nats.js.api import ConsumerConfig, StorageType, StreamConfig
from nats.js.errors import NoKeysError, NoStreamResponseError

from contracts import DeadLetter, TaskCompleted, TaskFailed, TaskRejected, TaskSpec, TaskSubmitted, TaskValidated
from contracts import subjects
from contracts.events import TASK_EVENTS
from contracts.policy import BudgetLimits, Defaults, Policy, RateLimit
from services.client import Client
from shared.bus import Bus
from shared.streams import INGRESS_DEDUP_WINDOW_S
from tests.conftest import stack, wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.integration]
ENCODER = msgspec.json.Encoder()
_task_event = msgspec.json.Decoder(Union[TASK_EVENTS]).decode


class Heard:
    """Every task event published while the block runs, in the order heard."""

    def __init__(self) -> None:
        self.events: list = []

    def of(self, task_id: str) -> list:
        return [event for event in self.events if event.task_id == task_id]

    async def first(self, pick: Callable[[object], bool], timeout: float = 10.0):
        async def found():
            return next((event for event in self.events if pick(event)), None)

        return await wait_until(found, timeout=timeout)


@asynccontextmanager
async def heard(client: Client) -> AsyncIterator[Heard]:
    seen = Heard()

    async def on_msg(msg) -> None:
        try:
            seen.events.append(_task_event(msg.data))
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
            pass  # what the tests publish on purpose

    sub = await client.bus.nc.subscribe(subjects.ALL_TASK_EVENTS, cb=on_msg, pending_msgs_limit=100_000)
    await client.bus.nc.flush()  # subscribed before anything is published
    try:
        yield seen
    finally:
        await sub.unsubscribe()


class Letters:
    def __init__(self, sub) -> None:
        self.sub = sub

    async def next(self, timeout: float = 10.0) -> tuple[DeadLetter, bytes]:
        """The next dead letter, and its size on the wire."""
        msg = await self.sub.next_msg(timeout=timeout)
        return msgspec.json.decode(msg.data, type=DeadLetter), len(msg.data)


@asynccontextmanager
async def dead_letters(client: Client, service: str) -> AsyncIterator[Letters]:
    sub = await client.bus.nc.subscribe(subjects.dead_letter(service))
    await client.bus.nc.flush()
    try:
        yield Letters(sub)
    finally:
        await sub.unsubscribe()


async def _keys(kv) -> list[str]:
    try:
        return await kv.keys()
    except NoKeysError:
        return []


async def _guard_decisions(client: Client, decision: str, count: int) -> bool:
    stats = await client.replica_stats("corral-guard")
    return bool(stats) and stats[0]["endpoints"][0]["data"]["decisions"].get(decision, 0) >= count


async def _settled(client: Client, task_id: str, tenant: str):
    reply = await client.cost(task_id, tenant=tenant)
    return reply if reply.status == "finished" else None


# --- ingress apart from internal events ------------------------------------------------------------------


async def test_streams_declared_over_the_old_layout_move_submissions_into_their_own_stream(settings):
    # An older Corral's task stream, which stored submissions too.
    old = await nats.connect(settings.nats_url, nkeys_seed=settings.nats_credentials)
    try:
        js = old.jetstream()
        await js.add_stream(StreamConfig(name=subjects.STREAM_TASKS, subjects=["corral.task.>"],
                                         storage=StorageType.FILE, duplicate_window=120))
        await js.add_consumer(subjects.STREAM_TASKS, ConsumerConfig(durable_name=subjects.CONSUMER_GUARD,
                                                                    filter_subject="corral.task.submitted.>"))
    finally:
        await old.close()
    async with Bus.connect(settings, "test-new") as bus:  # declares the streams again, as every service does
        tasks = await bus.js.stream_info(subjects.STREAM_TASKS)
        ingress = await bus.js.stream_info(subjects.STREAM_INGRESS)
        stored = await bus.js.publish(subjects.task_submitted("acme"), b"{}")
        internal = await bus.js.publish(subjects.task_validated("acme"), b"{}")
    assert set(tasks.config.subjects) == set(subjects.INTERNAL_TASK_EVENTS)
    assert ingress.config.subjects == [subjects.ALL_SUBMITTED]
    assert ingress.config.duplicate_window == INGRESS_DEDUP_WINDOW_S
    assert (stored.stream, internal.stream) == (subjects.STREAM_INGRESS, subjects.STREAM_TASKS)


@pytest.mark.parametrize("subject", ["corral.task.submitted", "corral.task.submitted.acme.extra"])
async def test_a_task_on_an_ingress_subject_without_exactly_one_tenant_token_is_stored_by_no_stream(
        settings, subject):
    task = TaskSubmitted(task_id="t-no-tenant", tenant="acme", user="bob", spec=TaskSpec(agent="research", prompt="p"))
    async with Bus.connect(settings, "test-publisher") as bus:
        with pytest.raises(NoStreamResponseError):  # the publisher learns at once: nothing will answer it
            await bus.js.publish(subject, ENCODER.encode(task), timeout=2)
        for stream in (subjects.STREAM_INGRESS, subjects.STREAM_TASKS):
            assert (await bus.js.stream_info(stream)).state.messages == 0


async def test_a_task_on_a_subject_whose_tenant_token_is_no_tenant_id_is_dead_lettered_not_left_unanswered(
        settings, user):
    async with stack(settings, "guard") as client, dead_letters(client, "guard") as letters:
        task = TaskSubmitted(task_id="t-odd", tenant="acme", user=user, spec=TaskSpec(agent="research", prompt="p"))
        await client.bus.js.publish("corral.task.submitted.a%b", ENCODER.encode(task))
        letter, _ = await letters.next()
    assert letter.subject == "corral.task.submitted.a%b"
    assert letter.reason.startswith("poison: ") and "valid tenant id" in letter.reason


async def test_a_submission_for_another_tenant_is_rejected_naming_both_and_runs_nothing_for_either(settings, user):
    async with stack(settings, "guard") as client, heard(client) as events:
        task = TaskSubmitted(task_id="t-forged", tenant="globex", user=user, spec=TaskSpec(agent="research", prompt="p"))
        await client.bus.js.publish(subjects.task_submitted("acme"), ENCODER.encode(task))
        answer = await events.first(lambda e: e.task_id == "t-forged" and not isinstance(e, TaskSubmitted))
        charged = [key for key in await _keys(await client.bus.bucket(subjects.KV_RATES)) if user in key]
        claims = [key for key in await _keys(await client.bus.bucket(subjects.KV_SUBMISSIONS)) if "t-forged" in key]
    assert isinstance(answer, TaskRejected)
    assert (answer.tenant, answer.reason, answer.stage) == ("acme", "invalid_request", "guard")
    assert "'acme'" in answer.message and "'globex'" in answer.message
    assert charged == [] and claims == []  # nobody's rate limit, no task claimed


# --- every bad input answered, nothing accepted and then lost ------------------------------------------------


def _deep(levels: int) -> bytes:
    return b"[" * levels + b"]" * levels


@pytest.mark.parametrize("where", ["an extra field", "metadata"])
async def test_a_task_nested_ten_thousand_levels_deep_is_rejected_and_dead_lettered_with_its_reason(
        settings, tenant, user, where):
    spec = b'{"agent":"research","prompt":"p","metadata":{"k":' + _deep(10_000) + b"}}" if where == "metadata" else \
        b'{"agent":"research","prompt":"p"}'
    extra = b',"extra":' + _deep(10_000) if where == "an extra field" else b""
    task_id = f"t-deep-{where.split()[-1]}"
    data = (b'{"kind":"task.submitted","task_id":"%s","tenant":"%s","user":"%s","spec":%s%s}'
            % (task_id.encode(), tenant.encode(), user.encode(), spec, extra))
    async with stack(settings, "guard") as client, heard(client) as events, \
            dead_letters(client, "guard") as letters:
        await client.bus.js.publish(subjects.task_submitted(tenant), data)
        answer = await events.first(lambda e: e.task_id == task_id)
        letter, _ = await letters.next()
        end = await client.run(TaskSpec(agent="painter", prompt="still answering?"), tenant=tenant, user=user)
    assert isinstance(answer, TaskRejected) and (answer.reason, answer.user) == ("invalid_request", user)
    assert ("nested too deeply" if where == "an extra field" else "spec.metadata") in answer.message
    assert letter.reason.startswith("undecodable: invalid_request") and f"answered {tenant}/{user}" in letter.reason
    assert (letter.payload, letter.payload_size) == (data[:4096], len(data))
    assert isinstance(end, TaskRejected) and end.reason == "unknown_agent"  # the guard goes on


async def test_nine_hundred_kib_of_random_bytes_are_dead_lettered_with_a_prefix_size_and_hash_that_fit(
        settings, tenant):
    data = random.Random(12).randbytes(900 * 1024)
    async with stack(settings, "guard") as client, dead_letters(client, "guard") as letters:
        await client.bus.js.publish(subjects.task_submitted(tenant), data)
        letter, size = await letters.next()

        async def terminated() -> bool:  # handled, not left to be redelivered and then dropped
            info = await client.bus.js.consumer_info(subjects.STREAM_INGRESS, subjects.CONSUMER_GUARD)
            return (info.num_pending, info.num_ack_pending) == (0, 0)

        await wait_until(terminated)
    assert (letter.payload, letter.payload_size) == (data[:4096], len(data))
    assert letter.payload_sha256 == hashlib.sha256(data).hexdigest()
    assert "payload_too_large" in letter.reason and "no task id and user to answer" in letter.reason
    assert size < 16 * 1024  # whatever the message's size


async def test_a_task_of_nine_hundred_kib_is_answered_as_too_large(settings, tenant, user):
    task = TaskSubmitted(task_id="t-900k", tenant=tenant, user=user,
                         spec=TaskSpec(agent="research", prompt="x" * 900 * 1024))
    data = ENCODER.encode(task)
    async with stack(settings, "guard") as client, heard(client) as events:
        await client.bus.js.publish(subjects.task_submitted(tenant), data)
        answer = await events.first(lambda e: e.task_id == "t-900k" and not isinstance(e, TaskSubmitted))
    assert isinstance(answer, TaskRejected) and answer.reason == "payload_too_large"
    assert f"{len(data)} bytes; the limit is {settings.max_payload_bytes}" in answer.message


# --- submissions de-duplicated per (tenant, task id) ---------------------------------------------------------


async def test_the_same_task_id_three_times_runs_once_is_answered_once_and_uses_the_rate_limit_once(
        settings, tenant, user):
    one_a_minute = Policy(defaults=Defaults(rate=RateLimit(requests_per_minute=1, burst_requests=2)))
    spec = TaskSpec(agent="research", prompt="once, please")
    async with stack(settings, "guard", "budget", "executor", "worker:research", policy=one_a_minute) as client, \
            heard(client) as events:
        for _ in range(3):
            await client.submit(spec, tenant=tenant, user=user, task_id="t-thrice")
        await wait_until(lambda: _guard_decisions(client, "repeated", 2))
        end = await events.first(lambda e: e.task_id == "t-thrice" and isinstance(e, TaskCompleted | TaskFailed))
        second = await client.run(TaskSpec(agent="research", prompt="another"), tenant=tenant, user=user)
        third = await client.run(TaskSpec(agent="research", prompt="one more"), tenant=tenant, user=user)
    about_it = events.of("t-thrice")
    assert isinstance(end, TaskCompleted)
    assert [type(e) for e in about_it if isinstance(e, TaskValidated | TaskRejected | TaskCompleted)] == [
        TaskValidated, TaskCompleted]
    assert isinstance(second, TaskCompleted)  # the repeats left the second request of the burst
    assert isinstance(third, TaskRejected) and third.reason == "rate_limited"


async def test_a_task_id_refused_once_is_judged_afresh_each_time_it_is_submitted_again(settings, tenant, user):
    async with stack(settings, "guard") as client, heard(client) as events:
        def decisions() -> list:
            return [e for e in events.of("t-again") if isinstance(e, TaskValidated | TaskRejected)]

        async def decided(count: int):
            return decisions() if len(decisions()) >= count else None

        for count, prompt in enumerate(["", " ", "fixed now"], start=1):  # refused, refused again, then right
            await client.submit(TaskSpec(agent="research", prompt=prompt), tenant=tenant, user=user,
                                task_id="t-again")
            answers = await wait_until(lambda c=count: decided(c))
    assert [type(e) for e in answers] == [TaskRejected, TaskRejected, TaskValidated]
    assert {e.reason for e in answers[:2]} == {"invalid_request"}
    assert answers[0].dedup_key() != answers[1].dedup_key()  # each submission's answer is stored


async def test_a_task_id_another_tenant_already_used_is_another_task(settings, user):
    async with stack(settings, "guard", "budget", "executor", "worker:research") as client:
        acme = await client.run(TaskSpec(agent="research", prompt="acme's"), tenant="acme", user=user,
                                task_id="t-shared")
        globex = await client.run(TaskSpec(agent="research", prompt="globex's"), tenant="globex", user=user,
                                  task_id="t-shared")
        costs = [await wait_until(lambda t=t: _settled(client, "t-shared", t)) for t in ("acme", "globex")]
        states = [await client.task_status("t-shared", tenant=t) for t in ("acme", "globex")]
    assert isinstance(acme, TaskCompleted) and isinstance(globex, TaskCompleted)
    assert (acme.tenant, globex.tenant) == ("acme", "globex")
    assert [cost.tenant for cost in costs] == ["acme", "globex"]
    assert [s.step_id for c in costs for s in c.steps] == ["acme/t-shared-s0a1", "globex/t-shared-s0a1"]
    assert [state.status for state in states] == ["completed", "completed"]


async def test_a_publisher_chosen_msg_id_naming_an_internal_event_does_not_silence_the_real_task(
        settings, tenant, user):
    victim = "t-victim"
    async with stack(settings, "guard", "budget", "executor", "worker:research") as client:
        decoy = TaskSubmitted(task_id="t-decoy", tenant=tenant, user=user, spec=TaskSpec(agent="research", prompt="d"))
        for forged in (f"{victim}:task.validated", f"{tenant}.{victim}:task.validated",
                       f"{tenant}.{victim}:task.admitted", f"{victim}:task.submitted"):
            await client.bus.js.publish(subjects.task_submitted(tenant), ENCODER.encode(decoy),
                                        headers={subjects.HEADER_MSG_ID: forged})
        end = await client.run(TaskSpec(agent="research", prompt="the real one"), tenant=tenant, user=user,
                               task_id=victim)
    assert isinstance(end, TaskCompleted) and end.task_id == victim


# --- schemas that refuse nonsense ----------------------------------------------------------------------------


@pytest.mark.parametrize("tokens", [-1_000_000, 10**12], ids=["negative", "a trillion"])
async def test_a_step_outcome_claiming_nonsense_tokens_is_dead_lettered_and_leaves_the_budget_as_it_was(
        settings, tenant, user, tokens):
    forged = {"kind": "step.completed", "task_id": "t-forged", "tenant": tenant, "user": user,
              "step_id": f"{tenant}/t-forged-s0a1", "attempt": 1, "agent": "research",
              "dependency": "simulated/sim-large", "model": "sim-large", "output": "ok", "latency_ms": 1.0,
              "usage": {"input_tokens": tokens, "output_tokens": 1}}
    async with stack(settings, "budget") as client, dead_letters(client, "budget") as letters:
        before = await client.budget(tenant, user)
        await client.bus.js.publish(subjects.step_completed(tenant), ENCODER.encode(forged))
        letter, _ = await letters.next()
        after = await client.budget(tenant, user)
    assert letter.reason.startswith("undecodable: ") and "usage.input_tokens" in letter.reason
    assert [(w.used, w.remaining) for w in after.windows] == [(w.used, w.remaining) for w in before.windows]
    assert all(w.remaining <= w.limit for w in after.windows)


# --- Corral's own clock --------------------------------------------------------------------------------------


async def test_tasks_stamped_in_the_year_2000_leave_the_monitors_latency_measured_from_their_receipt(
        settings, tenant, user):
    long_ago = datetime(2000, 1, 1, tzinfo=UTC)
    roomy = Policy(defaults=Defaults(budget=BudgetLimits(daily_tokens=100_000, hourly_tokens=100_000)))
    async with stack(settings, "guard", "budget", "executor", "worker:research", "monitor", policy=roomy) as client, \
            heard(client) as events:
        for n in range(3):
            task = TaskSubmitted(task_id=f"t-2000-{n}", tenant=tenant, user=user, occurred_at=long_ago,
                                 spec=TaskSpec(agent="research", prompt=f"from the past {n}"))
            await client.bus.js.publish(subjects.task_submitted(tenant), ENCODER.encode(task))
        ends = [await events.first(lambda e, n=n: e.task_id == f"t-2000-{n}" and isinstance(e, TaskCompleted))
                for n in range(3)]

        async def counted():
            report = await client.status()
            return report if report.latency.count == 3 else None

        report = await wait_until(counted)
    now = datetime.now(UTC)
    assert all(end.received_at is not None and now - end.received_at < timedelta(minutes=1) for end in ends)
    assert 0 < report.latency.p99_ms < 60_000
