"""Batching: an agent's model calls held per model and sent together through Anthropic's Message Batches API
(services/workers/batching.py), against a batch API server (tests/batch_api.py) in front of the real local
model, and billed at the batch price."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import msgspec
import pytest

from contracts import StepCompleted, TaskCompleted, TaskSpec
from contracts.events import Usage
from contracts.policy import AgentPolicy, Batching, Price, ProviderConfig, Strategy
from services.local_model import MODEL_NAME
from services.stack import free_port
from services.workers.batching import Batcher
from services.workers.conversation import ModelRequest, Turn
from services.workers.errors import PermanentProviderError, TransientProviderError
from services.workers.providers import build_provider
from services.workers.providers.batches import _outcomes
from tests.batch_api import READY
from tests.conftest import stack, wait_until
from tests.model_servers import local_model_url  # noqa: F401 - fixture
from tests.signals import signals
from tests.test_agents import CORE, agents_policy

ROOT = Path(__file__).resolve().parents[1]
MAX_TOKENS = 24
pytestmark = [pytest.mark.anyio]


@pytest.fixture
def batch_api(local_model_url: str, tmp_path: Path) -> Iterator[str]:  # noqa: F811 - the fixture above
    """A fresh batch API server in front of the local model; its `/v1` URL."""
    with (tmp_path / "batch-api.log").open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "tests.batch_api", "--upstream", local_model_url,
                                 "--max-tokens", "64"], stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT)
    try:
        line = proc.stdout.readline()
        assert line.startswith(READY), f"the batch API did not start; see {tmp_path / 'batch-api.log'}"
        yield line.removeprefix(READY).strip()
    finally:
        proc.terminate()
        proc.wait(10)


def batch_sizes(url: str) -> list[int]:
    stats = httpx.get(url.removesuffix("/v1") + "/stats").json()
    return [batch["size"] for batch in sorted(stats["batches"], key=lambda b: b["created_at"])]


def ask(prompt: str, max_tokens: int = MAX_TOKENS) -> ModelRequest:
    return ModelRequest(model=MODEL_NAME, max_tokens=max_tokens, messages=[Turn(role="user", content=prompt)])


def batching_agent(**settings) -> AgentPolicy:
    return AgentPolicy(chain=[Strategy(provider="batched", model=MODEL_NAME, timeout_s=120.0)],
                       batching=Batching(enabled=True, poll_s=0.05, **settings))


async def calls(url: str, requests: list[ModelRequest], **settings) -> list:
    """Each request sent at once through a running batcher: its Completion, or the ProviderError it raised."""
    provider = build_provider("batched", ProviderConfig(kind="anthropic", base_url=url, batches=True))
    batcher, stop = Batcher(), anyio.Event()
    outcomes: list = [None] * len(requests)

    async def one(n: int, through) -> None:
        try:
            outcomes[n] = await through.complete(requests[n])
        except (PermanentProviderError, TransientProviderError) as error:
            outcomes[n] = error

    async with anyio.create_task_group() as tg:
        await tg.start(batcher.run, stop)
        through = batcher.batched(provider, batching_agent(**settings))
        assert through is not provider
        async with anyio.create_task_group() as callers:
            for n in range(len(requests)):
                callers.start_soon(one, n, through)
        stop.set()
    await provider.aclose()
    return outcomes


# --- the batcher against the batch API ----------------------------------------------------------------------


@pytest.mark.integration
async def test_calls_made_at_once_go_to_the_provider_as_one_batch_and_each_gets_its_own_answer(batch_api):
    prompts = ["What is a message queue?", "Name a colour.", "What is two plus two?"]
    outcomes = await calls(batch_api, [ask(p) for p in prompts], max_wait_ms=1_000)
    assert batch_sizes(batch_api) == [3]
    for completion in outcomes:
        assert completion.text.strip() and completion.usage.batched and not completion.usage.estimated
        assert 0 < completion.usage.output_tokens <= MAX_TOKENS and completion.first_token_s is None
    assert len({c.text for c in outcomes}) == 3  # answers go back to the calls that asked, not shuffled
    alone = await calls(batch_api, [ask(prompts[1])], max_wait_ms=0)
    assert alone[0].text == outcomes[1].text  # greedy sampling: the same prompt alone gets the same answer


@pytest.mark.integration
async def test_a_lone_call_waits_its_max_wait_for_company_and_no_longer_is_needed_once_the_batch_is_full(batch_api):
    started = time.time()
    await calls(batch_api, [ask("Say yes.")], max_wait_ms=600)
    stats = httpx.get(batch_api.removesuffix("/v1") + "/stats").json()["batches"]
    assert stats[0]["created_at"] - started >= 0.6  # held for its whole wait
    started = time.time()
    await calls(batch_api, [ask("Say yes."), ask("Say no.")], max_wait_ms=60_000, max_batch=2)
    stats = httpx.get(batch_api.removesuffix("/v1") + "/stats").json()["batches"]
    assert stats[-1]["created_at"] - started < 30  # sent when full, long before its minute
    await calls(batch_api, [ask(f"Count to {n}.") for n in range(5)], max_wait_ms=2_000, max_batch=2)
    assert batch_sizes(batch_api)[2:] == [2, 2, 1]  # two full batches at once, the fifth call once its wait was up


@pytest.mark.integration
async def test_a_request_the_provider_refuses_fails_alone_and_the_rest_of_its_batch_answers(batch_api):
    outcomes = await calls(batch_api, [ask("Say yes."), ask("Say no.", max_tokens=500), ask("Say maybe.")],
                           max_wait_ms=500)
    assert batch_sizes(batch_api) == [3]
    assert isinstance(outcomes[1], PermanentProviderError) and "max_tokens: 500 > 64" in str(outcomes[1])
    assert outcomes[0].text.strip() and outcomes[2].text.strip()


async def test_a_batch_api_that_is_not_there_fails_every_call_as_transient():
    outcomes = await calls(f"http://127.0.0.1:{free_port()}/v1", [ask("a"), ask("b")], max_wait_ms=50)
    assert all(isinstance(o, TransientProviderError) and "cannot connect" in str(o) for o in outcomes)


@pytest.mark.integration
async def test_a_call_whose_step_gives_up_leaves_its_group_and_the_others_are_still_sent(batch_api):
    provider = build_provider("batched", ProviderConfig(kind="anthropic", base_url=batch_api, batches=True))
    batcher, stop = Batcher(), anyio.Event()
    answered = []
    async with anyio.create_task_group() as tg:
        await tg.start(batcher.run, stop)
        through = batcher.batched(provider, batching_agent(max_wait_ms=800))

        async def gives_up() -> None:
            with anyio.move_on_after(0.2):
                await through.complete(ask("Say no."))

        async def waits() -> None:
            answered.append(await through.complete(ask("Say yes.")))

        async with anyio.create_task_group() as callers:
            callers.start_soon(gives_up)
            callers.start_soon(waits)
        stop.set()
    await provider.aclose()
    assert batch_sizes(batch_api) == [1] and answered[0].text.strip()


@pytest.mark.integration
async def test_a_batch_every_call_of_which_gave_up_is_canceled_at_the_provider(batch_api):
    provider = build_provider("batched", ProviderConfig(kind="anthropic", base_url=batch_api, batches=True))
    batcher, stop = Batcher(), anyio.Event()
    stats_url = batch_api.removesuffix("/v1") + "/stats"
    async with httpx.AsyncClient() as http, anyio.create_task_group() as tg:
        await tg.start(batcher.run, stop)
        through = batcher.batched(provider, batching_agent(max_wait_ms=0))

        async def gives_up(prompt: str) -> None:
            with anyio.move_on_after(0.3):  # the batch was sent at once; its 64 tokens take longer
                await through.complete(ask(prompt, max_tokens=64))

        async with anyio.create_task_group() as callers:
            callers.start_soon(gives_up, "Write a long story about a queue.")
            callers.start_soon(gives_up, "Write a long poem about a lock.")
        canceled = await wait_until(lambda: _canceled(http, stats_url))
        stop.set()
    await provider.aclose()
    assert [batch["size"] for batch in canceled] == [2] and batcher.stats()["waiting"] == 0


async def _canceled(http: httpx.AsyncClient, url: str) -> list | None:
    batches = (await http.get(url)).json()["batches"]
    return batches if batches and all(batch["canceled"] for batch in batches) else None


# --- through the pipeline: billed at the batch price ------------------------------------------------------------


@pytest.mark.integration
async def test_a_batching_agents_tasks_complete_from_one_batch_and_are_billed_at_the_batch_price(
        settings, tenant, user, batch_api):
    providers = {"batched": ProviderConfig(kind="anthropic", base_url=batch_api, batches=True)}
    policy = agents_policy({"bulk": batching_agent(max_wait_ms=1_500)}, tools=[], providers=providers,
                           prices={MODEL_NAME: Price(input=1.0, output=2.0, cached=1.0, batch=0.5)})
    prompts = ["What is a queue?", "What is a cache?", "What is a lock?", "What is a log?"]
    ends: list = [None] * len(prompts)
    async with stack(settings, *CORE, "worker:bulk", policy=policy) as client, signals(client) as heard:
        async def run(n: int) -> None:
            ends[n] = await client.run(TaskSpec(agent="bulk", prompt=prompts[n], max_tokens=MAX_TOKENS),
                                       tenant=tenant, user=user)

        async with anyio.create_task_group() as tg:
            for n in range(len(prompts)):
                tg.start_soon(run, n)
        steps = [await heard.first(StepCompleted, task_id=end.task_id) for end in ends]
        costs = [await client.cost(end.task_id, tenant=tenant) for end in ends]
    assert batch_sizes(batch_api) == [4]
    assert all(isinstance(end, TaskCompleted) and end.output.strip() for end in ends), ends
    for step, cost in zip(steps, costs):
        assert step.usage.batched and step.first_token_ms is None
        full = (step.usage.input_tokens * 1.0 + step.usage.output_tokens * 2.0) / 1000
        assert cost.cost_usd == pytest.approx(full * 0.5) and cost.tokens == step.usage.total, (cost, step.usage)


# --- the parts -------------------------------------------------------------------------------------------------


def test_a_batched_call_costs_its_prices_batch_share_and_a_mixed_sum_is_billed_in_full():
    price = Price(input=1.0, output=2.0, cached=0.5, batch=0.5)
    batched = Usage(input_tokens=100, output_tokens=10, cached_tokens=40, batched=True)
    assert price.cost(batched) == pytest.approx((60 * 1.0 + 40 * 0.5 + 10 * 2.0) / 1000 * 0.5)
    plain = msgspec.structs.replace(batched, batched=False)
    assert Usage.sum([Usage(input_tokens=0, output_tokens=0), batched, batched]).batched
    assert not Usage.sum([batched, plain]).batched and not Usage.sum([]).batched


def test_the_policy_refuses_batches_on_a_provider_that_is_not_anthropic_and_a_batch_share_above_one():
    with pytest.raises(ValueError, match="kind anthropic"):
        ProviderConfig(kind="openai", batches=True)
    with pytest.raises(ValueError, match="batch share"):
        Price(input=1.0, output=1.0, batch=1.5)
    with pytest.raises(ValueError, match="max_batch"):
        Batching(max_batch=0)


def test_results_that_were_canceled_expired_missing_or_malformed_fail_their_own_call_as_transient():
    lines = b"\n".join([
        b'{"custom_id": "r0", "result": {"type": "canceled"}}',
        b'{"custom_id": "r1", "result": {"type": "expired"}}',
        b'not json',
        b'{"custom_id": "r3", "result": {"type": "succeeded", "message": {"content": [{"type": "text", "text": "hi"}],'
        b' "usage": {"input_tokens": 3, "output_tokens": 1}}}}',
        b'{"custom_id": "r9", "result": {"type": "succeeded", "message": {}}}'])  # answers no request
    requests = [ask(str(n)) for n in range(4)]
    outcomes = _outcomes(["r0", "r1", "r2", "r3"], requests, lines, "p")
    assert [type(o).__name__ for o in outcomes[:3]] == ["TransientProviderError"] * 3
    assert "canceled" in str(outcomes[0]) and "expired" in str(outcomes[1]) and "did not answer" in str(outcomes[2])
    assert outcomes[3].text == "hi" and outcomes[3].usage == Usage(input_tokens=3, output_tokens=1, batched=True)


def test_an_agent_without_batching_or_a_provider_without_a_batch_api_is_called_directly():
    batcher = Batcher()
    batcher._tasks = object()  # as if running: only the policy decides here
    on = build_provider("b", ProviderConfig(kind="anthropic", base_url="http://127.0.0.1:9/v1", batches=True))
    off = build_provider("p", ProviderConfig(kind="anthropic", base_url="http://127.0.0.1:9/v1"))
    agent = batching_agent()
    assert batcher.batched(off, agent) is off
    assert batcher.batched(on, AgentPolicy(chain=agent.chain)) is on
    assert batcher.batched(on, agent) is not on
