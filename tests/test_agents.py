"""Agents through the whole pipeline: the tool-calling loop, MCP tools, real models and what a model may not do.

The models are real programs speaking their protocols: the simulated provider (it calls each tool it is
offered once, then answers), llama.cpp's server with a real small model, and LiteLLM's proxy answering
with scripted tool calls and errors.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import msgspec
import pytest

from contracts import StepCompleted, TaskCompleted, TaskFailed, TaskSpec
from contracts.events import BreakerChanged
from contracts.policy import (
    AgentPolicy,
    BreakerSettings,
    McpServer,
    Policy,
    Strategy,
    ToolRules,
    WorkerSettings,
)
from services.client import Client
from shared.policy import load_policy_file
from tests.conftest import stack, wait_until
from tests.signals import example_policy, replica_views, signals
from tests.test_mcp import server_process

pytestmark = [pytest.mark.anyio]
ROOT = Path(__file__).resolve().parents[1]
CORE = ("guard", "budget", "executor", "breaker", "monitor")
LOOKUP = "mcp/facts/lookup"


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
