"""Automated rollback on the real stack: a policy whose chain routes to a failing model is rolled back by the
monitor within the window, and tasks succeed again, also when the change was made while no monitor ran; an
alert that was firing before a change, or a rule that may not roll back, leaves the policy as it is."""

from __future__ import annotations

from typing import Union

import msgspec
import pytest

from contracts import TaskCompleted, TaskFailed, TaskSpec, subjects
from contracts.commands import SimulateDependency
from contracts.events import Alert, PolicyRolledBack
from contracts.policy import AgentPolicy, AlertRule, Alerting, BudgetLimits, Defaults, Policy, RateLimit, Strategy
from shared.policy import read_policy
from tests.conftest import apply, running, stack, wait_until
from tests.test_alerts import publish_tasks

pytestmark = [pytest.mark.anyio, pytest.mark.integration]
ERRORS = AlertRule(name="errors", figure="error_rate", above=0.3, resolve_at=0.1, window="1m", severity="critical",
                   auto_rollback=True)
ROLLBACK_EVENTS = msgspec.json.Decoder(Union[Alert, PolicyRolledBack])


def routed_to(model: str, *rules: AlertRule, description: str = "") -> Policy:
    return Policy(description=description,
                  defaults=Defaults(budget=BudgetLimits(daily_tokens=1_000_000, hourly_tokens=1_000_000),
                                    rate=RateLimit(requests_per_minute=6000, burst_requests=100)),
                  agents={"research": AgentPolicy(chain=[Strategy(model=model, max_attempts=1)])},
                  alerting=Alerting(rules=list(rules or [ERRORS]), evaluate_every_s=0.1, rollback_window_s=600))


async def run_tasks(client, tenant: str, user: str, count: int, label: str) -> list:
    return [await client.run(TaskSpec(agent="research", prompt=f"{label} {n}"), tenant=tenant, user=user)
            for n in range(count)]


async def test_a_policy_that_routes_to_a_failing_model_is_rolled_back_and_tasks_succeed_again(settings, tenant, user):
    good = await apply(settings, routed_to("sim-small"))
    async with stack(settings, "guard", "budget", "executor", "worker:research", "monitor") as client:
        await client.simulate(SimulateDependency(dependency="simulated/sim-broken", mode="fail", error="permanent"),
                              expect=1)
        heard = await client.bus.nc.subscribe(subjects.POLICY_ROLLED_BACK)
        own_alert = await client.bus.nc.subscribe(subjects.alert("high", "policy_rolled_back"))
        before = await run_tasks(client, tenant, user, 3, "before")
        bad = await apply(settings, routed_to("sim-broken", description="routes research to a broken model"))

        async def seen_by_the_monitor():
            return (await client.alerts()).policy_change.get("version") == bad
        await wait_until(seen_by_the_monitor, timeout=20)
        broken = await run_tasks(client, tenant, user, 3, "broken")
        rolled = ROLLBACK_EVENTS.decode((await heard.next_msg(timeout=30)).data)
        alert = ROLLBACK_EVENTS.decode((await own_alert.next_msg(timeout=10)).data)
        error_rate_at_rollback = (await client.status()).scopes[0].windows["1m"].error_rate
        after = await run_tasks(client, tenant, user, 6, "after")
        error_rate_after = (await client.status()).scopes[0].windows["1m"].error_rate
        version, current = await read_policy(await client.bus.policy_bucket())
    assert [type(end).__name__ for end in before + after] == ["TaskCompleted"] * 9
    assert any(isinstance(end, TaskFailed) for end in broken)
    assert isinstance(rolled, PolicyRolledBack)
    assert (rolled.from_version, rolled.restored_version, rolled.to_version) == (bad, good, version)
    assert (rolled.alert.rule, rolled.alert.severity) == ("errors", "critical")
    assert current.agents["research"].chain[0].model == "sim-small"
    assert isinstance(alert, Alert) and alert.rule == "policy_rolled_back" and f"policy {bad}" in alert.message
    assert error_rate_after < error_rate_at_rollback


async def test_an_alert_firing_before_a_change_or_a_rule_that_may_not_roll_back_leaves_the_policy(settings, tenant):
    steps = AlertRule(name="tokens", figure="tokens_per_hour", above=-1, severity="critical", auto_rollback=False)
    await apply(settings, routed_to("sim-small", ERRORS))
    async with stack(settings, "monitor") as client:
        await publish_tasks(client, tenant, "early", ok=0, failed=3)

        async def errors_firing():
            return [a for a in (await client.alerts()).firing if a.rule == "errors"]
        await wait_until(errors_firing, timeout=20)
        changed = await apply(settings, routed_to("sim-small", ERRORS, steps, description="an unrelated change"))

        async def tokens_firing():  # a new critical alert after the change, of a rule that may not roll back
            reply = await client.alerts()
            return reply.policy_change.get("version") == changed and [a for a in reply.firing if a.rule == "tokens"]
        await wait_until(tokens_firing, timeout=20)
        await publish_tasks(client, tenant, "late", ok=0, failed=3)  # more errors: the alert was firing already
        reply = await client.alerts(history=True)
        stats = (await client.replica_stats("corral-monitor"))[0]["endpoints"][0]["data"]
        version, _ = await read_policy(await client.bus.policy_bucket())
    assert version == changed
    assert stats["alerts"]["rolled_back"] == 0
    assert reply.policy_change["rolled_back"] == 0.0
    assert [a.rule for a in reply.history] == ["errors", "tokens"]


async def test_a_change_made_while_no_monitor_ran_is_judged_and_rolled_back_by_the_monitor_that_starts_next(
        settings, tenant, user):
    good = await apply(settings, routed_to("sim-small"))
    async with stack(settings, "monitor"):
        pass  # a monitor ran on this stack, and left its snapshot
    bad = await apply(settings, routed_to("sim-broken", description="applied while no monitor ran"))
    async with stack(settings, "guard", "budget", "executor", "worker:research") as client:
        await client.simulate(SimulateDependency(dependency="simulated/sim-broken", mode="fail", error="permanent"),
                              expect=1)
        broken = await run_tasks(client, tenant, user, 3, "broken")
        heard = await client.bus.nc.subscribe(subjects.POLICY_ROLLED_BACK)
        async with running(settings, "monitor"):
            rolled = ROLLBACK_EVENTS.decode((await heard.next_msg(timeout=30)).data)
        after = await run_tasks(client, tenant, user, 2, "after")
        version, current = await read_policy(await client.bus.policy_bucket())
    assert [type(end).__name__ for end in broken] == ["TaskFailed"] * 3
    assert isinstance(rolled, PolicyRolledBack)
    assert (rolled.from_version, rolled.restored_version, rolled.to_version) == (bad, good, version)
    assert current.agents["research"].chain[0].model == "sim-small"
    assert [type(end).__name__ for end in after] == ["TaskCompleted"] * 2
