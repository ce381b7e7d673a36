"""Approval gates end to end on a real nats-server: a step stops before a high-stakes tool call, the task waits,
a reviewer decides, and only the gated call runs (once), with the conversation carried over so nothing before
the gate runs again. The high-stakes tool is the built-in http_get against a loopback site that counts hits;
the simulated model calls every tool it is offered once, its prompt as the arguments."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import asynccontextmanager

import anyio
import msgspec
import pytest

from contracts import StepCompleted, StepRequested, TaskCompleted, TaskFailed, TaskSpec
from contracts.approvals import Approval, DecideApproval, ListApprovals
from contracts.events import Plan, Subtask
from contracts.policy import ApprovalRules, Defaults, ToolRules, WorkerSettings
from services.client import Client, new_task_id
from tests.conftest import stack, wait_until
from tests.signals import example_policy, signals
from tests.test_tools import Site, answer

pytestmark = [pytest.mark.anyio, pytest.mark.integration]
SERVICES = ("guard", "budget", "executor", "breaker", "approvals", "worker:research")


@pytest.fixture
def site() -> Iterator[Site]:
    """The side effect: every fetch of /pay or /refund is one."""
    server = Site({"/pay": lambda h: answer(h, 200, b"paid"), "/refund": lambda h: answer(h, 200, b"refunded")})
    server.thread.start()
    yield server
    server.shutdown()
    server.server_close()


def gated_policy(site: Site, **rules):
    policy = example_policy()
    defaults = msgspec.structs.replace(
        policy.defaults, tools=ToolRules(allowed=["search", "http_get"], high_stakes=["http_get"]),
        approvals=ApprovalRules(reviewers={"reviewers": ["operator", "alice", "bob"]}, **rules))
    return msgspec.structs.replace(policy, defaults=defaults, workers=WorkerSettings(http_allowed_hosts=[site.host]))


def pay(site: Site, path: str = "/pay") -> TaskSpec:
    return TaskSpec(agent="research", prompt=site.url(path), tools=["search", "http_get"])


@asynccontextmanager
async def gated_stack(settings, site: Site, *more: str, **rules):
    async with stack(settings, *SERVICES, *more, policy=gated_policy(site, **rules)) as client, \
            signals(client) as heard, \
            anyio.create_task_group() as tg:
        client.runs = tg
        yield client, heard


class Run:
    """A task submitted and followed to its end in the background, while the test decides its approvals."""

    def __init__(self, client: Client, spec: TaskSpec, tenant: str, user: str) -> None:
        self.task_id, self.end = new_task_id(), None
        client.runs.start_soon(self._follow, client, spec, tenant, user)

    async def _follow(self, client: Client, spec: TaskSpec, tenant: str, user: str) -> None:
        self.end = await client.run(spec, tenant=tenant, user=user, task_id=self.task_id, timeout=60)

    async def ended(self):
        async def end():
            return self.end

        return await wait_until(end, timeout=60)


async def waiting_approval(client: Client, task_id: str, tenant: str = "default") -> Approval:
    async def found():
        listed = await client.approvals(ListApprovals(tenant=tenant))
        return next((a for a in listed.approvals if a.request.task_id == task_id), None)

    return await wait_until(found, timeout=20)


def decide(approval: Approval, decision: str, **fields) -> DecideApproval:
    return DecideApproval(tenant=approval.request.tenant, approval_id=approval.request.approval_id,
                          decision=decision, **fields)


async def test_a_high_stakes_call_waits_for_approval_then_runs_once_and_the_steps_before_it_do_not_run_again(
        settings, site, tenant, user):
    async with gated_stack(settings, site) as (client, heard):
        run = Run(client, pay(site), tenant, user)
        task_id = run.task_id
        approval = await waiting_approval(client, task_id)
        status = await client.task_status(task_id, tenant=tenant)
        hits_while_waiting = site.hits
        first = await client.decide_approval(decide(approval, "approve", reason="expected"), reviewer="alice")
        again = await client.decide_approval(decide(approval, "approve"), reviewer="alice")
        raced = await client.decide_approval(decide(approval, "deny", reason="no"), reviewer="bob")
        end = await run.ended()
        steps = heard.of(StepRequested, task_id=task_id)
        outcomes = heard.of(StepCompleted, task_id=task_id)
    assert (approval.request.tool, approval.request.arguments) == ("http_get", f'{{"url":"{site.url("/pay")}"}}')
    assert approval.request.rule == "high_stakes_tool" and approval.request.usage_so_far.total > 0
    assert status.status == "waiting_for_approval" and status.waiting_for_approval == [approval.request.approval_id]
    assert hits_while_waiting == 0
    assert first.ok and again.ok and "already approved by you" in again.message
    assert not raced.ok and "already approved by alice" in raced.message
    assert isinstance(end, TaskCompleted), end
    assert site.hits == 1  # the approved call, once
    gated_step, resumed = steps
    assert gated_step.gated_tools == ["http_get"] and gated_step.resume is None
    assert resumed.resume is not None and resumed.step_id == f"{gated_step.step_id}=r1"
    carried = [turn.name for turn in resumed.resume.turns if turn.role == "tool"]
    assert carried == ["search"]  # the search before the gate is carried as a result, not run again
    stopped, finished = sorted(outcomes, key=lambda o: o.step_id)
    assert [c.dependency for c in stopped.calls] == ["simulated/sim-large", "tool/search"]
    assert [c.dependency for c in finished.calls] == ["tool/http_get", "simulated/sim-large"]
    assert end.usage.total == stopped.usage.total + finished.usage.total


async def test_a_denied_call_never_runs_and_the_task_fails_with_the_reviewers_reason(settings, site, tenant, user):
    async with gated_stack(settings, site) as (client, _):
        run = Run(client, pay(site), tenant, user)
        approval = await waiting_approval(client, run.task_id)
        await client.decide_approval(decide(approval, "deny", reason="not this quarter"), reviewer="bob")
        end = await run.ended()
    assert isinstance(end, TaskFailed) and site.hits == 0
    assert f"approval {approval.request.approval_id} was denied by bob: not this quarter" in end.error


async def test_a_denied_call_under_on_deny_continue_is_answered_to_the_model_as_refused_and_the_step_goes_on(
        settings, site, tenant, user):
    async with gated_stack(settings, site, on_deny="continue") as (client, heard):
        run = Run(client, pay(site), tenant, user)
        approval = await waiting_approval(client, run.task_id)
        await client.decide_approval(decide(approval, "deny", reason="not this quarter"), reviewer="bob")
        again = await client.decide_approval(decide(approval, "deny", reason="not this quarter"), reviewer="bob")
        raced = await client.decide_approval(decide(approval, "approve"), reviewer="alice")
        end = await run.ended()
        steps = heard.of(StepRequested, task_id=run.task_id)
        outcomes = heard.of(StepCompleted, task_id=run.task_id)
    assert isinstance(end, TaskCompleted), end
    assert again.ok and not raced.ok and "already denied by bob" in raced.message
    assert site.hits == 0  # the denied call was never made, and a racing approval did not make it
    gated_step, resumed = steps
    assert resumed.step_id == f"{gated_step.step_id}=r1" and resumed.resume.approved == []
    refusal = f"approval {approval.request.approval_id} was denied by bob: not this quarter"
    assert resumed.resume.refused == refusal
    stopped, finished = sorted(outcomes, key=lambda o: o.step_id)
    assert [c.dependency for c in finished.calls] == ["simulated/sim-large"]  # no http_get: the model went on
    assert end.usage.total == stopped.usage.total + finished.usage.total


async def test_an_edited_call_runs_with_the_reviewers_arguments(settings, site, tenant, user):
    async with gated_stack(settings, site) as (client, _):
        run = Run(client, pay(site), tenant, user)
        approval = await waiting_approval(client, run.task_id)
        edited = f'{{"url":"{site.url("/refund")}"}}'
        await client.decide_approval(decide(approval, "edit", arguments=edited), reviewer="alice")
        end = await run.ended()
    assert isinstance(end, TaskCompleted), end
    assert site.hits == 1 and "refunded" not in end.output  # the simulated model writes its own text


async def test_an_approval_nobody_decides_by_its_deadline_fails_the_task_and_a_late_approval_is_refused(
        settings, site, tenant, user):
    async with gated_stack(settings, site, deadline_s=1.0) as (client, _):
        run = Run(client, pay(site), tenant, user)
        approval = await waiting_approval(client, run.task_id)
        end = await run.ended()
        late = await client.decide_approval(decide(approval, "approve"), reviewer="alice")
    assert isinstance(end, TaskFailed) and site.hits == 0
    assert f"approval {approval.request.approval_id} timed out: no decision by the deadline" in end.error
    assert not late.ok and "already timed_out by its deadline" in late.message


async def test_a_plan_subtask_that_requires_approval_waits_before_it_starts_while_the_others_run(
        settings, site, tenant, user):
    plan = Plan(subtasks=[Subtask(id="facts", agent="research", instruction="Gather the facts."),
                          Subtask(id="wire", agent="research", instruction="Wire the refund.", requires_approval=True)],
                synthesis="research")
    spec = TaskSpec(agent="research", prompt="Refund the customer.", orchestration="centralized", plan=plan)
    async with gated_stack(settings, site) as (client, heard):
        run = Run(client, spec, tenant, user)
        approval = await waiting_approval(client, run.task_id)
        facts_done = await heard.first(StepCompleted, task_id=run.task_id)
        asked_so_far = [r.subtask for r in heard.of(StepRequested, task_id=run.task_id)]
        edit = await client.decide_approval(decide(approval, "edit", arguments="{}"), reviewer="alice")
        await client.decide_approval(decide(approval, "approve"), reviewer="alice")
        end = await run.ended()
        asked = [r.subtask for r in heard.of(StepRequested, task_id=run.task_id)]
    assert (approval.request.rule, approval.request.tool, approval.request.subtask) == ("requires_approval", None,
                                                                                        "wire")
    assert approval.request.step_input == "Wire the refund."
    assert facts_done.step_id.endswith("-facts-s0a1") and asked_so_far == ["facts"]  # the other part ran meanwhile
    assert not edit.ok and "no arguments to edit" in edit.message
    assert isinstance(end, TaskCompleted), end
    assert sorted(asked) == ["", "facts", "wire"]  # each part once, then the synthesis


@pytest.mark.parametrize("rules, rule, why", [
    ({"agents": ["research"]}, "agent_kind", "every step of agent kind 'research' is reviewed"),
    ({"cost_above_tokens": 100}, "cost_above", "the task's estimate of 396 tokens is above 100")])
async def test_a_step_a_policy_rule_reviews_waits_before_it_starts_and_a_denial_fails_the_task(
        settings, site, tenant, user, rules, rule, why):
    async with gated_stack(settings, site, **rules) as (client, heard):
        run = Run(client, TaskSpec(agent="research", prompt="Summarise the design"), tenant, user)
        approval = await waiting_approval(client, run.task_id)
        await client.decide_approval(decide(approval, "deny", reason="not today"), reviewer="bob")
        end = await run.ended()
    assert (approval.request.rule, approval.request.why) == (rule, why)
    assert isinstance(end, TaskFailed) and "denied by bob: not today" in end.error
    assert heard.of(StepRequested, task_id=run.task_id) == []  # nothing ran


async def test_the_next_step_of_a_task_whose_cost_so_far_is_above_the_policys_amount_waits_once_for_approval(
        settings, site, tenant, user):
    plan = Plan(subtasks=[Subtask(id="facts", agent="research", instruction="Gather the facts."),
                          Subtask(id="notes", agent="research", instruction="Write it up.", needs=["facts"])],
                synthesis="research")
    spec = TaskSpec(agent="research", prompt="Close the month.", orchestration="centralized", plan=plan)
    async with gated_stack(settings, site, cost_above_usd=0.000001) as (client, heard):
        run = Run(client, spec, tenant, user)
        approval = await waiting_approval(client, run.task_id)
        facts = await heard.first(StepCompleted, task_id=run.task_id)
        asked_so_far = [r.subtask for r in heard.of(StepRequested, task_id=run.task_id)]
        await client.decide_approval(decide(approval, "approve"), reviewer="alice")
        end = await run.ended()
        asked = [r.subtask for r in heard.of(StepRequested, task_id=run.task_id)]
        every = await client.approvals(ListApprovals(tenant=approval.request.tenant, status=None))
    cost = example_policy().price_of(facts.model).cost(facts.usage)
    assert (approval.request.rule, approval.request.tool, approval.request.subtask) == ("cost_above", None, "notes")
    assert cost > 0.000001 and approval.request.cost_so_far_usd == pytest.approx(cost)
    assert approval.request.usage_so_far.total == facts.usage.total
    assert approval.request.why == f"the task's cost so far of ${cost:.6f} is above $1e-06"
    assert asked_so_far == ["facts"]  # the first part cost nothing before it: it ran unasked
    assert isinstance(end, TaskCompleted), end
    assert sorted(asked) == ["", "facts", "notes"]
    assert [a.request.task_id for a in every.approvals].count(run.task_id) == 1  # the synthesis did not ask again


async def test_a_distributed_subtask_that_would_call_a_high_stakes_tool_fails_without_calling_it(
        settings, site, tenant, user):
    plan = Plan(subtasks=[Subtask(id="pay", agent="research", instruction=site.url("/pay"),
                                  tools=["search", "http_get"])], synthesis="research")
    spec = TaskSpec(agent="research", prompt="Pay the invoice.", orchestration="distributed", plan=plan,
                    tools=["search", "http_get"])
    async with gated_stack(settings, site) as (client, _):
        run = Run(client, spec, tenant, user)
        end = await run.ended()
    assert isinstance(end, TaskFailed), end
    assert "high-stakes tool 'http_get', which needs approval" in end.error and site.hits == 0


@pytest.mark.parametrize("part, rules, refusal", [
    (dict(tools=["search", "http_get"]), {}, "would call the high-stakes tool 'http_get', which needs approval"),
    (dict(requires_approval=True), {}, "needs approval before it starts (the plan's subtask requires approval)"),
    ({}, {"agents": ["research"]}, "needs approval before it starts (every step of agent kind 'research' is "
                                   "reviewed)")])
async def test_a_hybrid_subtask_handed_to_the_fallback_agent_meets_the_same_gate_and_fails_without_running_it(
        settings, site, tenant, user, part, rules, refusal):
    from contracts.boards import Board
    from contracts.policy import AgentPolicy, OrchestrationLimits, Strategy
    from shared.bus import Bus

    policy = gated_policy(site, **rules)
    unstaffed = AgentPolicy(chain=[Strategy(provider="simulated", model="sim-small", tier="fast")])
    policy = msgspec.structs.replace(
        policy, agents={**policy.agents, "translation": unstaffed},  # known to the policy, run by no worker
        orchestration=OrchestrationLimits(handoff_timeout_s=0.5, fallback_agent="research"))
    plan = Plan(subtasks=[Subtask(id="pay", agent="translation", instruction=site.url("/pay"), **part)])
    spec = TaskSpec(agent="writing", prompt="Pay the invoice.", orchestration="hybrid", plan=plan,
                    tools=["search", "http_get"])
    async with stack(settings, *SERVICES, policy=policy) as client, signals(client) as heard:
        end = await client.run(spec, tenant=tenant, user=user, timeout=60)
        steps = heard.of(StepRequested, task_id=end.task_id)
        async with Bus.connect(settings, "test-board") as bus:
            entry = await (await bus.bucket("corral_boards")).get(end.task_ref)
    assert isinstance(end, TaskFailed), end
    (pay,) = msgspec.json.decode(entry.value, type=Board).entries
    assert pay.handed_over and pay.spec.agent == "research" and pay.status == "failed"
    assert refusal in pay.error and "distributed and hybrid tasks cannot wait for one" in pay.error
    assert site.hits == 0
    if "tools" not in part:  # a step that needs approval before it starts does not start
        assert steps == []


async def test_a_subtask_stopped_at_a_gate_waits_while_the_rest_of_the_plan_goes_on_and_resumes_once_approved(
        settings, site, tenant, user):
    plan = Plan(subtasks=[Subtask(id="facts", agent="research", instruction="Gather the facts."),
                          Subtask(id="pay", agent="research", instruction="Pay the invoice.",
                                  tools=["search", "http_get"]),
                          Subtask(id="notes", agent="research", instruction="Write it up.", needs=["facts"])],
                synthesis="research")
    spec = TaskSpec(agent="research", prompt="Close the month.", orchestration="centralized", plan=plan,
                    tools=["search", "http_get"])
    async with gated_stack(settings, site) as (client, heard):
        run = Run(client, spec, tenant, user)
        approval = await waiting_approval(client, run.task_id)

        async def others_done():
            done = {c.step_id.split("-")[-2] for c in heard.of(StepCompleted, task_id=run.task_id) if not c.gated}
            return done >= {"facts", "notes"}

        await wait_until(others_done)
        status = await client.task_status(run.task_id, tenant=tenant)
        await client.decide_approval(decide(approval, "approve"), reviewer="alice")
        end = await run.ended()
        asked = heard.of(StepRequested, task_id=run.task_id)
    assert approval.request.subtask == "pay" and approval.request.tool == "http_get"
    assert status.status == "waiting_for_approval"  # facts and notes ended; pay waits; no synthesis yet
    assert isinstance(end, TaskCompleted), end
    pay = [r for r in asked if r.subtask == "pay"]
    assert len(pay) == 2 and pay[1].step_id == f"{pay[0].step_id}=r1" and pay[1].resume is not None
    assert sorted(r.subtask for r in asked) == ["", "facts", "notes", "pay", "pay"]  # each part once, resumed once


async def test_a_gated_step_is_never_kept_in_nor_answered_from_the_response_cache(settings, site, tenant, user):
    from contracts.policy import ResponseCache

    policy = gated_policy(site)
    research = msgspec.structs.replace(policy.agents["research"],
                                       cache=ResponseCache(enabled=True, cache_tool_answers=True))
    policy = msgspec.structs.replace(policy, agents={**policy.agents, "research": research})
    async with stack(settings, *SERVICES, policy=policy) as client, anyio.create_task_group() as tg:
        client.runs = tg
        ends = []
        for _ in range(2):  # the same task twice: the second is not answered from the first's gated outcome
            run = Run(client, pay(site), tenant, user)
            approval = await waiting_approval(client, run.task_id)
            await client.decide_approval(decide(approval, "approve"), reviewer="alice")
            ends.append(await run.ended())
    assert all(isinstance(end, TaskCompleted) and end.dependency != "cache" for end in ends), ends
    assert site.hits == 2  # each approved call made


async def test_the_live_views_count_the_approvals_waiting(settings, site, tenant, user):
    from services.dashboard.samples import History, observe

    async with gated_stack(settings, site, "monitor") as (client, _):
        before = await observe(client, History(), 0.0)
        run = Run(client, pay(site), tenant, user)
        approval = await waiting_approval(client, run.task_id)
        during = await observe(client, History(), 1.0)
        await client.decide_approval(decide(approval, "approve"), reviewer="alice")
        await run.ended()
        after = await observe(client, History(), 2.0)
    assert (before.approvals_waiting, during.approvals_waiting, after.approvals_waiting) == (0, 1, 0)
