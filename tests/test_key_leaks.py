"""A provider's key goes to the provider and nowhere else: not into any stream or bucket, log file or
exported span, nor into an error, even when the provider refuses it.

Every service runs as its own process, exporting every span with prompts and answers in them
(`trace_content`), against the local model server started to require a recognisable key.
"""

from __future__ import annotations

import secrets

import pytest
from nats.js.errors import NotFoundError

from contracts import TaskCompleted, TaskFailed, TaskSpec
from contracts.policy import AgentPolicy, ProviderConfig, Strategy
from services.client import Client
from services.local_model import MODEL_NAME, local_model_server
from shared.bus import Bus
from tests.conftest import apply, services, wait_until
from tests.otlp_receiver import OtlpReceiver
from tests.test_agents import agents_policy

pytestmark = [pytest.mark.anyio, pytest.mark.integration]
KEY = f"sk-corral-canary-{secrets.token_hex(12)}"
WRONG_KEY = f"sk-corral-wrong-canary-{secrets.token_hex(12)}"
AGENTS = {"keyed-openai": "right-openai", "keyed-anthropic": "right-anthropic", "wrong-key": "wrong"}


def leak_policy(url: str):
    providers = {
        "right-openai": ProviderConfig(kind="openai", base_url=url, api_key_env="CORRAL_CANARY_KEY"),
        "right-anthropic": ProviderConfig(kind="anthropic", base_url=url, api_key_env="CORRAL_CANARY_KEY"),
        "wrong": ProviderConfig(kind="openai", base_url=url, api_key_env="CORRAL_WRONG_CANARY_KEY"),
    }
    agents = {agent: AgentPolicy(chain=[Strategy(provider=provider, model=MODEL_NAME, max_attempts=1)])
              for agent, provider in AGENTS.items()}
    return agents_policy(agents, tools=[], providers=providers)


async def stored_messages(settings) -> list[bytes]:
    """Every message of every stream (the buckets' included), with its headers."""
    found = []
    async with Bus.connect(settings, "test-leaks") as bus:
        for info in await bus.js.streams_info():
            for seq in range(max(1, info.state.first_seq), info.state.last_seq + 1):
                try:
                    msg = await bus.js.get_msg(info.config.name, seq)
                except NotFoundError:
                    continue
                found.append((msg.data or b"") + repr(msg.headers).encode())
    return found


async def test_a_providers_key_is_in_no_stream_bucket_log_or_span_and_a_refused_key_in_no_error(
        settings, tenant, user, tmp_path):
    keys = {"CORRAL_CANARY_KEY": KEY, "CORRAL_WRONG_CANARY_KEY": WRONG_KEY}
    with OtlpReceiver() as collector, local_model_server(tmp_path / "model", api_key_env="CORRAL_CANARY_KEY",
                                                         env=keys) as url:
        await apply(settings, leak_policy(url))
        env = {**keys, "CORRAL_OTLP_ENDPOINT": collector.endpoint, "CORRAL_TRACE_CONTENT": "1"}
        stack = services(settings, tmp_path / "logs", env=env, agents=tuple(AGENTS))
        stack.start()
        try:
            async with Client.connect(settings, "test") as client:
                await client.wait_ready(stack.names(), timeout=90)
                ends = {agent: await client.run(TaskSpec(agent=agent, prompt="Say hi.", max_tokens=8),
                                                tenant=tenant, user=user) for agent in AGENTS}

            async def exported():
                return len(collector.named("invoke_agent")) >= len(AGENTS) and len(collector.named("chat ")) >= 3

            await wait_until(exported, timeout=15)
        finally:
            stack.stop()
        messages = await stored_messages(settings)
    assert isinstance(ends["keyed-openai"], TaskCompleted) and isinstance(ends["keyed-anthropic"], TaskCompleted)
    refused = ends["wrong-key"]
    assert isinstance(refused, TaskFailed) and refused.reason == "permanent_error"
    assert "401" in refused.error  # the server refused the wrong key: it was sent, and its refusal reported
    chats = {span[3]["gen_ai.provider.name"]: span[3] for span in collector.named("chat ")}
    assert set(chats) == {"openai", "anthropic"}  # each protocol's spans, with what users wrote (content on)
    assert all("Say hi." in chat["gen_ai.input.messages"] for chat in chats.values())
    logs = {path.name: path.read_bytes() for path in tmp_path.rglob("*.log")}
    assert len(messages) > 20 and collector.raw and "worker-wrong-key.log" in logs
    for key in (KEY, WRONG_KEY):
        secret = key.encode()
        assert not [m for m in messages if secret in m], "a key is in a stream or bucket"
        assert not [name for name, text in logs.items() if secret in text], "a key is in a log file"
        assert not [body for body in collector.raw if secret in body], "a key is in an exported span"
