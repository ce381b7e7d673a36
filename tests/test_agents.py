"""Agents through the whole pipeline: the tool-calling loop, MCP tools, real models and what a model may not do.

The models are real programs speaking their protocols: the simulated provider (it calls each tool it is
offered once, then answers), llama.cpp's server with a real small model, and LiteLLM's proxy answering
with scripted tool calls and errors.
"""

from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

import msgspec
import pytest

from contracts import StepCompleted, StepFailed, StepRequested, TaskCompleted, TaskFailed, TaskProgress, TaskSpec
from contracts.events import BreakerChanged
from contracts.policy import (
    AgentPolicy,
    BreakerSettings,
    McpServer,
    Policy,
    ProviderConfig,
    Strategy,
    ToolRules,
    WorkerSettings,
)
from services.client import Client
from services.stack import LOCAL_STRATEGY
from shared.policy import load_policy_file
from tests.conftest import stack, wait_until
from tests.signals import example_policy, replica_views, signals
from tests.model_servers import LiteLLMProxy, litellm, litellm_key_env, local_model_url  # noqa: F401 - fixtures
from tests.test_mcp import server_process

pytestmark = [pytest.mark.anyio]
ROOT = Path(__file__).resolve().parents[1]
CORE = ("guard", "budget", "executor", "breaker", "monitor")
LOOKUP = "mcp/facts/lookup"
FALLBACK = Strategy(provider="simulated", model="sim-small", tier="fast", max_attempts=1)


def agents_policy(agents: dict[str, AgentPolicy], *, tools: list[str], workers: WorkerSettings = WorkerSettings(),
                  **changes) -> Policy:
    """The resilience example's roomy limits, with these agents and tools allowed."""
    policy = example_policy(**changes)
    defaults = msgspec.structs.replace(policy.defaults, tools=ToolRules(allowed=tools))
    return msgspec.structs.replace(policy, agents=agents, defaults=defaults, workers=workers)


async def offered(client: Client, agent: str, tool: str) -> bool:
    """Whether the worker of `agent` offers `tool` (its $SRV.STATS)."""
    replies = await client.replica_stats(f"corral-worker-{agent}", expect=1)
    return any(tool in (reply["endpoints"][0].get("data") or {}).get("tools", {}).get("tools", [])
               for reply in replies)


def test_the_agents_example_policy_loads_with_its_providers_tools_and_mcp_server():
    policy = load_policy_file(ROOT / "docs" / "policy-agents.example.toml")
    assert [s.provider for s in policy.agents["research"].chain] == ["openai", "anthropic", "local"]
    assert policy.provider("anthropic").kind == "anthropic" and policy.provider("openai").api_key_env
    assert policy.provider("local").base_url == ""  # the stack's own server
    assert "docs" in policy.workers.mcp_servers and policy.agents["research"].max_turns == 8


@pytest.mark.integration
async def test_an_mcp_tool_runs_in_the_loop_and_when_its_server_goes_away_its_breaker_opens_while_other_tools_work(
        settings, tenant, user, tmp_path):
    simulated = Strategy(provider="simulated", model="sim-small", tier="fast", max_attempts=1)
    with contextmanager(server_process)(tmp_path / "mcp.log") as server:
        policy = agents_policy(
            {"toolsmith": AgentPolicy(chain=[simulated])}, tools=["lookup", "calculator"],
            workers=WorkerSettings(mcp_servers={"facts": McpServer(url=server.url, timeout_s=5)}),
            breaker_overrides={LOOKUP: BreakerSettings(window_size=2, minimum_calls=2, wait_in_open_s=600)})
        async with stack(settings, *CORE, "worker:toolsmith", policy=policy) as client, signals(client) as heard:
            await wait_until(lambda: offered(client, "toolsmith", "lookup"), timeout=20)
            looked_up = await client.run(TaskSpec(agent="toolsmith", prompt="the answer", tools=["lookup"]),
                                         tenant=tenant, user=user)
            server.kill()
            while_down = [await client.run(TaskSpec(agent="toolsmith", prompt=f"again {n}", tools=["lookup"]),
                                           tenant=tenant, user=user) for n in range(2)]
            opened = await heard.first(BreakerChanged, dependency=LOOKUP, state="open")
            await wait_until(lambda: _worker_sees_open(client))
            while_open = await client.run(TaskSpec(agent="toolsmith", prompt="once more", tools=["lookup"]),
                                          tenant=tenant, user=user)
            calculated = await client.run(TaskSpec(agent="toolsmith", prompt="6 * 7", tools=["calculator"]),
                                          tenant=tenant, user=user)
            step = await heard.first(StepCompleted, task_id=looked_up.task_id)
            calculator_step = await heard.first(StepCompleted, task_id=calculated.task_id)
    assert isinstance(looked_up, TaskCompleted)
    assert [c.dependency for c in step.calls] == ["simulated/sim-small", LOOKUP, "simulated/sim-small"]
    assert step.turns == 2 and step.usage.output_tokens > 0
    assert all(isinstance(end, TaskFailed) and end.reason == "attempts_exhausted" for end in while_down)
    assert all(end.attempts[0].dependency == LOOKUP and end.attempts[0].error == "transient" for end in while_down)
    assert isinstance(while_open, TaskFailed) and while_open.reason == "breaker_open"
    assert opened.previous == "closed"
    assert isinstance(calculated, TaskCompleted)  # the calculator answered 42 to the model, which then answered
    assert [c.dependency for c in calculator_step.calls] == ["simulated/sim-small", "tool/calculator",
                                                             "simulated/sim-small"]


async def _worker_sees_open(client: Client) -> bool:
    return [view.get("state") for view in await replica_views(client, "corral-worker-toolsmith", LOOKUP, 1)] == [
        "open"]


@pytest.mark.integration
async def test_a_task_naming_a_tool_no_worker_has_fails_permanently_saying_which(settings, tenant, user):
    simulated = Strategy(provider="simulated", model="sim-small", tier="fast", max_attempts=3)
    policy = agents_policy({"toolsmith": AgentPolicy(chain=[simulated])}, tools=["weather"])
    async with stack(settings, *CORE, "worker:toolsmith", policy=policy) as client:
        end = await client.run(TaskSpec(agent="toolsmith", prompt="rain?", tools=["weather"]), tenant=tenant,
                               user=user)
    assert isinstance(end, TaskFailed) and end.reason == "permanent_error"
    assert [a.error for a in end.attempts] == ["permanent"]  # not retried: no replica has it either
    assert "no tool 'weather'" in end.error


# --- against LiteLLM's proxy: scripted tool calls and errors, over both protocols ---------------------------

PROTOCOLS = ("openai", "anthropic")


def litellm_provider(proxy: LiteLLMProxy, key_env: str, kind: str = "openai") -> dict[str, ProviderConfig]:
    return {"litellm": ProviderConfig(kind=kind, base_url=proxy.base_url, api_key_env=key_env)}


def on_litellm(model: str, **options) -> AgentPolicy:
    strategy = Strategy(provider="litellm", model=model, tier="standard", max_attempts=1)
    return AgentPolicy(chain=[strategy], **options)


@pytest.mark.integration
@pytest.mark.parametrize("kind", PROTOCOLS)
async def test_an_agent_with_two_built_in_tools_and_an_mcp_tool_runs_a_tool_calling_loop_through_the_pipeline(
        settings, tenant, user, tmp_path, litellm, litellm_key_env, kind):
    proxy_host = litellm.url.removeprefix("http://")
    tools = ["calculator", "http_get", "lookup"]
    with contextmanager(server_process)(tmp_path / "mcp.log") as server:
        policy = agents_policy(
            {"toolsmith": on_litellm("tools-then-text")}, tools=tools,
            providers=litellm_provider(litellm, litellm_key_env, kind),
            workers=WorkerSettings(http_allowed_hosts=[proxy_host],
                                   mcp_servers={"facts": McpServer(url=server.url, timeout_s=5)}))
        async with stack(settings, *CORE, "worker:toolsmith", policy=policy) as client, signals(client) as heard:
            await wait_until(lambda: offered(client, "toolsmith", "lookup"), timeout=20)
            end = await client.run(TaskSpec(agent="toolsmith", prompt="Use every tool.", tools=tools),
                                   tenant=tenant, user=user)
            step = await heard.first(StepCompleted, task_id=end.task_id)
    assert isinstance(end, TaskCompleted), end
    said = end.output.removeprefix("The tools said: ").split(" | ")
    assert said[0] == "42"  # the calculator's answer to 6 * 7, fed back to the model, which quoted it
    assert said[1].startswith("HTTP 200") and "alive" in said[1]  # http_get fetched the allowed host
    assert said[2] == "value of corral"  # the MCP server's answer
    model = "litellm/tools-then-text"
    assert [c.dependency for c in step.calls] == [model, "tool/calculator", "tool/http_get", LOOKUP, model]
    assert all(c.error is None for c in step.calls)
    assert step.turns == 2 and step.refused_tool_calls == 0
    assert (step.usage.input_tokens, step.usage.output_tokens, step.usage.estimated) == (22, 14, False)


@pytest.mark.integration
@pytest.mark.parametrize("kind", PROTOCOLS)
@pytest.mark.parametrize(("model", "refusal"), [
    ("once/send_email", "refused: tool 'send_email' is not available to this task (available: calculator)"),
    ("bad-arguments/calculator", "refused: the arguments are not a JSON object"),
])
async def test_a_tool_call_the_model_may_not_make_is_refused_in_the_worker_told_to_the_model_and_counted(
        settings, tenant, user, litellm, litellm_key_env, kind, model, refusal):
    policy = agents_policy({"toolsmith": on_litellm(model)}, tools=["calculator", "send_email"],
                           providers=litellm_provider(litellm, litellm_key_env, kind))
    async with stack(settings, *CORE, "worker:toolsmith", policy=policy) as client, signals(client) as heard:
        end = await client.run(TaskSpec(agent="toolsmith", prompt="Try it.", tools=["calculator"]),
                               tenant=tenant, user=user)
        step = await heard.first(StepCompleted, task_id=end.task_id)
    assert isinstance(end, TaskCompleted), end
    assert end.output.startswith("The tool said: ") and refusal in end.output
    assert step.refused_tool_calls == 1 and step.turns == 2
    assert [c.dependency for c in step.calls] == [f"litellm/{model}"] * 2  # no tool was called


@pytest.mark.integration
async def test_a_model_that_keeps_calling_tools_ends_the_step_at_max_turns_as_permanent(
        settings, tenant, user, litellm, litellm_key_env):
    policy = agents_policy({"toolsmith": on_litellm("always/calculator", max_turns=3)}, tools=["calculator"],
                           providers=litellm_provider(litellm, litellm_key_env))
    async with stack(settings, *CORE, "worker:toolsmith", policy=policy) as client, signals(client) as heard:
        end = await client.run(TaskSpec(agent="toolsmith", prompt="Loop.", tools=["calculator"]),
                               tenant=tenant, user=user)
        step = await heard.first(StepFailed, task_id=end.task_id)
    assert isinstance(end, TaskFailed) and end.reason == "permanent_error"
    assert "max_turns=3" in end.error and len(end.attempts) == 1
    assert [c.dependency for c in step.calls] == ["litellm/always/calculator", "tool/calculator"] * 3


@pytest.mark.integration
@pytest.mark.parametrize("kind", PROTOCOLS)
@pytest.mark.parametrize(("model", "error", "attempts"), [
    ("rate-limited/0.3", "rate_limited", 2),  # retried after its Retry-After, then the next strategy
    ("server-error", "transient", 2),  # retried, then the next strategy
    ("context-too-long", "permanent", 1),  # the next strategy at once
])
async def test_each_provider_error_class_takes_its_retry_and_fallback_path_and_its_breaker_counts_it_if_retryable(
        settings, tenant, user, litellm, litellm_key_env, kind, model, error, attempts):
    chain = [Strategy(provider="litellm", model=model, tier="standard", max_attempts=2), FALLBACK]
    policy = agents_policy({"chatty": AgentPolicy(chain=chain)}, tools=[],
                           providers=litellm_provider(litellm, litellm_key_env, kind),
                           breaker_overrides={f"litellm/{model}": BreakerSettings(window_size=2, minimum_calls=2)})
    async with stack(settings, *CORE, "worker:chatty", policy=policy) as client, signals(client) as heard:
        end = await client.run(TaskSpec(agent="chatty", prompt="Hello?"), tenant=tenant, user=user)
        status = await client.task_status(end.task_id)
        again = await client.run(TaskSpec(agent="chatty", prompt="Again?"), tenant=tenant, user=user)
        if error != "permanent":  # two tasks' calls fill its window: it trips
            await heard.first(BreakerChanged, dependency=f"litellm/{model}", state="open")
        failures = heard.of(StepFailed, task_id=end.task_id)
        opened = heard.breaker(f"litellm/{model}", "open")
    assert isinstance(end, TaskCompleted) and end.tier == "fast", end  # the fallback answered
    assert [(a.dependency, a.error) for a in status.attempts] == [(f"litellm/{model}", error)] * attempts
    assert isinstance(again, TaskCompleted)
    # a permanent error blames the request, not the provider: its breaker does not count it
    assert (opened is None) == (error == "permanent")
    if error == "rate_limited":
        assert failures[0].retry_after_s == pytest.approx(0.3)
        retried = heard.of(StepRequested, task_id=end.task_id)[1]
        assert (retried.occurred_at - failures[0].occurred_at).total_seconds() >= 0.3
    if error == "permanent":
        assert "context" in status.attempts[0].message.lower()  # the provider's own words


@pytest.mark.integration
async def test_a_provider_that_refuses_connections_is_transient_and_falls_back(settings, tenant, user):
    from services.stack import free_port

    closed = ProviderConfig(kind="openai", base_url=f"http://127.0.0.1:{free_port()}/v1")
    chain = [Strategy(provider="nowhere", model="m", max_attempts=2), FALLBACK]
    policy = agents_policy({"chatty": AgentPolicy(chain=chain)}, tools=[], providers={"nowhere": closed})
    async with stack(settings, *CORE, "worker:chatty", policy=policy) as client:
        end = await client.run(TaskSpec(agent="chatty", prompt="Anyone?"), tenant=tenant, user=user)
        status = await client.task_status(end.task_id)
    assert isinstance(end, TaskCompleted) and end.tier == "fast"
    assert [(a.dependency, a.error) for a in status.attempts] == [("nowhere/m", "transient")] * 2


# --- a real model: llama.cpp's server with SmolLM2-135M, on both protocols -----------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("kind", PROTOCOLS)
async def test_a_plain_agent_answers_from_the_real_local_model_streaming_its_answer_as_progress(
        settings, tenant, user, local_model_url, kind):
    providers = {} if kind == "openai" else {"local": ProviderConfig(kind="anthropic", base_url=local_model_url)}
    policy = agents_policy({"assistant": AgentPolicy(chain=[LOCAL_STRATEGY])}, tools=[], providers=providers)
    pieces: list[TaskProgress] = []

    def on_progress(progress: TaskProgress) -> None:
        if progress.stage == "streaming":
            pieces.append(progress)

    async with stack(settings.with_changes(local_model_url=local_model_url), *CORE, "worker:assistant",
                     policy=policy) as client, signals(client) as heard:
        end = await client.run(TaskSpec(agent="assistant", prompt="Say hello in five words.", max_tokens=24),
                               tenant=tenant, user=user, on_progress=on_progress)
        step = await heard.first(StepCompleted, task_id=end.task_id)
    assert isinstance(end, TaskCompleted), end
    assert end.model == LOCAL_STRATEGY.model and end.output.strip()
    assert end.usage.input_tokens > 0 and 0 < end.usage.output_tokens <= 24 and not end.usage.estimated
    assert [p.seq for p in pieces] == list(range(1, len(pieces) + 1))
    assert "".join(p.message for p in pieces) == end.output  # streamed as it was generated, all of it
    assert step.first_token_ms is not None and 0 < step.first_token_ms < step.latency_ms


@pytest.mark.integration
def test_corral_up_with_the_local_model_puts_every_agent_on_it_and_submit_follow_prints_the_answer_as_it_streams(
        tmp_path):
    from tests.test_auth_cli import CORRAL, _up

    with _up(tmp_path, "--model", "local") as url:
        done = subprocess.run([*CORRAL, "submit", "Say hello in five words.", "--agent", "research", "--user",
                               "alice", "--max-tokens", "24", "--nats", url], cwd=tmp_path, capture_output=True,
                              text=True, timeout=120, env={**os.environ, "COLUMNS": "200",
                                                           "CORRAL_NATS_CREDENTIALS": ""})
    lines = done.stdout.splitlines()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "calling local/smollm2-135m" in lines[0]
    answer, summary = lines[1], lines[2]
    assert answer.strip() and summary.startswith("completed ")  # the streamed answer, then how it ended
    assert lines[3:] == []  # the answer was not printed again


@pytest.mark.integration
async def test_a_tools_output_is_cut_to_the_policys_size_before_the_model_sees_it(
        settings, tenant, user, litellm, litellm_key_env):
    policy = agents_policy({"toolsmith": on_litellm("tool-then-text")}, tools=["http_get"],
                           providers=litellm_provider(litellm, litellm_key_env),
                           workers=WorkerSettings(http_allowed_hosts=[litellm.url.removeprefix("http://")],
                                                  max_tool_output_chars=12))
    async with stack(settings, *CORE, "worker:toolsmith", policy=policy) as client:
        end = await client.run(TaskSpec(agent="toolsmith", prompt="Fetch.", tools=["http_get"]), tenant=tenant,
                               user=user)
    assert isinstance(end, TaskCompleted), end
    assert end.output == "The tool said: HTTP 200 OK…"  # 12 characters of the tool's answer, the last an ellipsis
