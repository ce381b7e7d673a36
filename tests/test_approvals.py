"""The approvals service on a real nats-server: a request becomes a record, decided once by a reviewer of its
tenant's group, or by its deadline (deny, or escalate with a new deadline), every change an event."""

from __future__ import annotations

import uuid
from contextlib import asynccontextmanager

import anyio
import msgspec
import pytest

from contracts import subjects
from contracts.approvals import (
    ApprovalDecided,
    ApprovalHistory,
    ApprovalRequested,
    DecideApproval,
    ListApprovals,
    ShowApproval,
)
from contracts.policy import ApprovalRules, Policy, TenantPolicy
from services.client import Client
from tests.conftest import Clock, mid_window_clock, running, wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.integration]
_decided = msgspec.json.Decoder(ApprovalDecided).decode
RULES = ApprovalRules(reviewers={"leads": ["alice", "bob"], "owners": ["carol"]}, group="leads", deadline_s=60,
                      on_timeout="escalate", escalate_to="owners", escalation_deadline_s=30)


def policy(rules: ApprovalRules = RULES) -> Policy:
    return Policy(tenants={"acme": TenantPolicy(approvals=rules), "default": TenantPolicy()})


def request(task_id: str, **fields) -> ApprovalRequested:
    return ApprovalRequested(**{"task_id": task_id, "tenant": "acme", "user": "u1",
                                "approval_id": uuid.uuid4().hex, "step_id": f"acme/{task_id}-s0a1",
                                "agent": "research", "tool": "send_email", "arguments": '{"to":"ceo"}', **fields})


@asynccontextmanager
async def approvals(settings, clock: Clock | None = None, rules: ApprovalRules = RULES):
    clocks = {"approvals": clock} if clock else None
    async with running(settings, "approvals", policy=policy(rules), clocks=clocks), \
            Client.connect(settings, "test") as client:
        await client.wait_ready({"corral-approvals"}, timeout=90)
        decided: list[ApprovalDecided] = []

        async def heard(msg) -> None:
            decided.append(_decided(msg.data))

        sub = await client.bus.nc.subscribe(subjects.ALL_APPROVAL_DECIDED, cb=heard)
        client.decided = decided
        yield client
        await sub.unsubscribe()


async def opened(client: Client, asked: ApprovalRequested):
    await client.bus.emit(subjects.approval_requested(asked.tenant), asked)

    async def shown():
        reply = await client.approval(ShowApproval(tenant=asked.tenant, approval_id=asked.approval_id))
        return reply.approval if reply.ok else None

    return await wait_until(shown)


def decide(asked: ApprovalRequested, decision: str, **fields) -> DecideApproval:
    return DecideApproval(tenant=asked.tenant, approval_id=asked.approval_id, decision=decision, **fields)


async def test_a_request_waits_for_its_tenants_first_group_and_is_approved_by_one_of_its_reviewers(settings):
    async with approvals(settings) as client:
        asked = request("t1")
        record = await opened(client, asked)
        assert (record.status, record.group) == ("pending", "leads")
        listed = await client.approvals(ListApprovals(tenant="acme"))
        assert asked.approval_id in [a.request.approval_id for a in listed.approvals]
        reply = await client.decide_approval(decide(asked, "approve", reason="fine"), reviewer="alice")
        assert reply.ok and reply.approval.status == "approved" and reply.approval.decided_by == "alice"
        event = await wait_until(lambda: _first(client.decided, asked.approval_id))
    assert (event.outcome, event.reviewer, event.arguments, event.group) == ("approved", "alice", '{"to":"ceo"}',
                                                                              "leads")


async def _first(decided: list[ApprovalDecided], approval_id: str,
                 outcome: str | None = None) -> ApprovalDecided | None:
    return next((event for event in decided if event.approval_id == approval_id
                 and outcome in (None, event.outcome)), None)


async def test_two_reviewers_racing_get_one_decision_and_the_loser_is_told_who_decided(settings):
    async with approvals(settings) as client:
        asked = request("t2")
        await opened(client, asked)
        replies = {}

        async def send(reviewer: str, decision: str) -> None:
            replies[reviewer] = await client.decide_approval(decide(asked, decision, reason="no"), reviewer=reviewer)

        async with anyio.create_task_group() as tg:
            tg.start_soon(send, "alice", "approve")
            tg.start_soon(send, "bob", "deny")
        again = await client.decide_approval(decide(asked, "approve", reason="no"), reviewer="alice")
        await wait_until(lambda: _first(client.decided, asked.approval_id))
        await anyio.sleep(0.3)  # room for a second decision event, which must not come
        events = [e for e in client.decided if e.approval_id == asked.approval_id]
    winner, loser = sorted(replies, key=lambda who: not replies[who].ok)
    assert replies[winner].ok and not replies[loser].ok
    assert f"already {replies[winner].approval.status} by {winner}" in replies[loser].message
    assert len(events) == 1 and events[0].reviewer == winner
    assert again.ok == (winner == "alice")  # the winner's repeat is no new decision; the loser's is refused


async def test_a_reviewer_outside_the_group_is_refused_with_who_may_decide(settings):
    async with approvals(settings) as client:
        asked = request("t3")
        await opened(client, asked)
        reply = await client.decide_approval(decide(asked, "approve"), reviewer="carol")
        shown = await client.approval(ShowApproval(tenant="acme", approval_id=asked.approval_id))
    assert not reply.ok
    assert "reviewer 'carol' may not decide for tenant 'acme'" in reply.message and "alice, bob" in reply.message
    assert shown.approval.status == "pending"


async def test_a_denial_needs_a_reason_and_an_edit_needs_a_json_object(settings):
    async with approvals(settings) as client:
        asked = request("t4")
        await opened(client, asked)
        no_reason = await client.decide_approval(decide(asked, "deny"), reviewer="bob")
        bad_edit = await client.decide_approval(decide(asked, "edit", arguments="[1, 2"), reviewer="bob")
        edited = await client.decide_approval(decide(asked, "edit", arguments='{"to":"cfo"}'), reviewer="bob")
        event = await wait_until(lambda: _first(client.decided, asked.approval_id))
    assert not no_reason.ok and "needs a reason" in no_reason.message
    assert not bad_edit.ok and "not a JSON object" in bad_edit.message
    assert edited.ok and (event.outcome, event.arguments) == ("edited", '{"to":"cfo"}')


async def test_no_decision_by_the_deadline_escalates_once_then_times_out_and_a_late_approval_is_refused(
        settings):
    clock = Clock(1_000_000.0)
    async with approvals(settings, clock) as client:
        asked = request("t5")
        await opened(client, asked)
        clock.now += 61
        escalated = await wait_until(lambda: _first(client.decided, asked.approval_id))
        assert (escalated.outcome, escalated.group, escalated.deadline_at) == ("escalated", "owners", clock.now + 30)
        by_lead = await client.decide_approval(decide(asked, "approve"), reviewer="alice")
        clock.now += 31
        ended = await wait_until(lambda: _first(client.decided, asked.approval_id, "timed_out"))
        late = await client.decide_approval(decide(asked, "approve"), reviewer="carol")
        history = await client.approval_history(ApprovalHistory(tenant="acme", task_id="t5"))
    assert not by_lead.ok and "group 'owners'" in by_lead.message  # after escalation, only the owners decide
    assert ended.reason.startswith("no decision by the deadline")
    assert not late.ok and "already timed_out by its deadline" in late.message
    assert [type(e).__name__ for e in history.events] == ["ApprovalRequested", "ApprovalDecided", "ApprovalDecided"]


async def test_an_approval_after_the_deadline_is_refused_and_says_so(settings):
    clock = Clock(2_000_000.0)
    rules = msgspec.structs.replace(RULES, deadline_s=3600.0, on_timeout="deny", escalate_to=None)
    async with approvals(settings, clock, rules) as client:
        asked = request("t6")
        await opened(client, asked)
        clock.now += 3600  # the deadline, before the tick has acted on it
        reply = await client.decide_approval(decide(asked, "approve"), reviewer="alice")
    assert not reply.ok
    # refused by the deadline itself, or by the timeout the tick applied at it: either way, too late
    assert "deadline" in reply.message and reply.approval.status in ("pending", "timed_out")


async def test_a_task_waiting_for_approval_keeps_its_budget_hold_past_the_hold_timeout_until_decided(
        settings, tenant, user):
    from datetime import timedelta

    from tests.test_budget import _status, budget, validated
    from tests.test_budget import decide as admit

    clock = Clock(mid_window_clock()())
    quick = settings.with_changes(budget_hold_timeout_s=60.0, budget_sweep_s=0.2)
    async with budget(quick, clock=clock) as client:
        await admit(client, validated("w1", tenant, user, 300))  # waits for a person
        await admit(client, validated("w2", tenant, user, 300))  # does not: the sweep's witness
        asked = request("w1", tenant=tenant, user=user)
        await client.bus.emit(subjects.approval_requested(tenant), asked)
        await wait_until(lambda: _held(client, tenant, user, "w1", waiting=True))
        clock.now += timedelta(hours=2)
        await wait_until(lambda: _status(client, "w2", "expired"))  # the sweep passed, after the timeout
        kept = await client.cost("w1")
        await client.bus.emit(subjects.approval_decided(tenant), ApprovalDecided(
            task_id="w1", tenant=tenant, user=user, approval_id=asked.approval_id, outcome="approved", seq=1))
        await wait_until(lambda: _held(client, tenant, user, "w1", waiting=False))
        clock.now += timedelta(minutes=2)  # the hold's clock restarted at the decision
        expired = await wait_until(lambda: _status(client, "w1", "expired"))
    assert kept.status != "expired" and expired.status == "expired"


async def _held(client, tenant: str, user: str, task_id: str, *, waiting: bool) -> bool:
    from services.budget.handlers import user_key
    from services.budget.ledger import Account
    from shared.kv import TypedBucket

    accounts = TypedBucket(await client.bus.bucket(subjects.KV_BUDGET), Account, Account)
    account = await accounts.get(user_key(tenant, user))
    hold = account.holds.get(task_id) if account else None
    return hold is not None and hold.waiting == waiting


GARBAGE = b"\x00not json {"
NESTED = b'{"tenant": "acme", "approval_id": "x", "decision": "approve", "reason": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"


async def test_nonsense_on_every_endpoint_is_answered_with_why_and_a_bad_record_is_quarantined_not_fatal(
        settings):
    from tests.test_poison import dead_letters

    async with approvals(settings) as client:
        nc = client.bus.nc
        asked = request("t7")
        await opened(client, asked)
        await (await client.bus.bucket(subjects.KV_APPROVALS)).put("acme.poisoned", GARBAGE)
        replies = {subject: await nc.request(subject, payload, timeout=5)
                   for subject, payload in ((subjects.APPROVALS_LIST, GARBAGE), (subjects.APPROVALS_SHOW, b"{}"),
                                            (subjects.APPROVALS_HISTORY, b'{"limit": -1}'),
                                            (subjects.approvals_decide("alice"), NESTED))}
        await nc.publish(subjects.approval_requested("acme"), GARBAGE)  # (a core publish: the stream stores it)
        letters = await wait_until(lambda: _letters(client, dead_letters), timeout=15)
        poisoned = await client.decide_approval(DecideApproval(tenant="acme", approval_id="poisoned",
                                                               decision="approve"), reviewer="alice")
        still = await client.decide_approval(decide(asked, "approve"), reviewer="alice")
    for subject, reply in replies.items():
        assert reply.headers and reply.headers.get("Nats-Service-Error"), subject  # an error reply, with why
    assert "ValidationError" in replies[subjects.APPROVALS_HISTORY].headers["Nats-Service-Error"]
    assert {letter.subject for letter in letters} >= {subjects.approval_requested("acme"),
                                                        f"$KV.{subjects.KV_APPROVALS}.acme.poisoned"}
    assert not poisoned.ok and "no approval poisoned" in poisoned.message
    assert still.ok  # the service kept serving


async def _letters(client: Client, dead_letters):
    if (await client.bus.js.stream_info(subjects.STREAM_DLQ)).state.messages < 2:
        return None
    letters = [letter for letter in await dead_letters(client.bus.js) if letter.service == "approvals"]
    return letters if len(letters) >= 2 else None


async def test_a_pending_approval_is_reminded_every_period_until_decided(settings):
    from contracts.approvals import ApprovalReminder

    clock = Clock(3_000_000.0)
    rules = msgspec.structs.replace(RULES, remind_every_s=10.0)
    async with approvals(settings, clock, rules) as client:
        reminders: list[ApprovalReminder] = []
        decode = msgspec.json.Decoder(ApprovalReminder).decode

        async def heard(msg) -> None:
            reminders.append(decode(msg.data))

        sub = await client.bus.nc.subscribe(subjects.approval_reminder("acme"), cb=heard)
        asked = request("t8")
        await opened(client, asked)
        for n in (1, 2):
            clock.now += 10
            await wait_until(lambda: _count(reminders, n))
        await client.decide_approval(decide(asked, "approve"), reviewer="bob")
        await wait_until(lambda: _first(client.decided, asked.approval_id))
        await sub.unsubscribe()
        shown = await client.approval(ShowApproval(tenant="acme", approval_id=asked.approval_id))
    assert [(r.seq, r.group) for r in reminders] == [(1, "leads"), (2, "leads")]
    assert shown.approval.reminders == 2 and shown.approval.status == "approved"


async def _count(items: list, n: int) -> bool:
    return len(items) >= n
