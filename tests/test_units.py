"""Small pieces, no server: settings, offline tokens, the simulated model, percentiles."""

from __future__ import annotations

import socket

import anyio
import pytest
from nats.aio.msg import Msg

from services import stack
from services.monitor.handlers import percentiles
from services.workers.errors import PermanentProviderError, TransientProviderError
from services.workers.conversation import ModelRequest, ToolSpec, Turn
from services.workers.simulated import SimulatedProvider
from shared.config import load_settings
from shared.consume import _deliveries
from shared.errors import ConfigError
from shared.tokens import count_tokens, encoding_for


def ask(text: str, *, model: str = "m", max_tokens: int = 5, call_id: str = "c", attempt: int = 1,
        tools: list[ToolSpec] = ()) -> ModelRequest:
    return ModelRequest(model=model, messages=[Turn(role="user", content=text)], max_tokens=max_tokens,
                        call_id=call_id, attempt=attempt, tools=list(tools))


def test_settings_come_from_defaults_then_file_then_environment(tmp_path):
    config = tmp_path / "corral.toml"
    config.write_text('concurrency = 16\nsim_latency_s = 0.5\nnats_url = "nats://a:4222"\n')
    settings = load_settings(config, env={"CORRAL_SIM_LATENCY_S": "0.25", "CORRAL_NATS_URL": "nats://b:4222"})
    assert settings.concurrency == 16
    assert settings.sim_latency_s == 0.25
    assert settings.nats_url == "nats://b:4222"


def test_an_invalid_setting_is_refused_with_the_field_named(tmp_path):
    with pytest.raises(ConfigError, match="concurrency must be positive"):
        load_settings(env={"CORRAL_CONCURRENCY": "0"})
    with pytest.raises(ConfigError, match="invalid setting"):
        load_settings(env={"CORRAL_MAX_DELIVER": "three"})


def test_an_unknown_key_in_the_settings_file_is_refused(tmp_path):
    config = tmp_path / "corral.toml"
    config.write_text("concurrenci = 5\n")
    with pytest.raises(ConfigError, match="concurrenci"):
        load_settings(config, env={})


def test_tokens_are_counted_offline_even_with_the_network_unreachable(monkeypatch):
    encoding_for.cache_clear()

    def no_network(*args, **kwargs):
        raise OSError("network unreachable (test)")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    assert count_tokens("hello world") == 2
    assert count_tokens("<|endoftext|>") > 1  # special-token text counts as plain text


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_simulated_model_is_deterministic_and_honours_max_tokens(anyio_backend):
    model = SimulatedProvider(latency_s=0)
    first = await model.complete(ask("same", model="sim-large", max_tokens=12, call_id="c1", attempt=1))
    again = await model.complete(ask("same", model="sim-large", max_tokens=12, call_id="c2", attempt=1))
    assert first == again
    assert first.text.startswith("[simulated")
    assert first.usage.output_tokens == count_tokens(first.text) <= 12


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_simulated_model_fails_as_its_prompt_directs(anyio_backend):
    model = SimulatedProvider(latency_s=0)
    with pytest.raises(PermanentProviderError):
        await model.complete(ask("x [sim:fail=permanent]", model="m", max_tokens=5, call_id="c", attempt=1))
    with pytest.raises(TransientProviderError):
        await model.complete(ask("x [sim:flaky=1]", model="m", max_tokens=5, call_id="c", attempt=1))
    ok = await model.complete(ask("x [sim:flaky=1]", model="m", max_tokens=5, call_id="c", attempt=2))
    assert ok.usage.output_tokens > 0
    with anyio.fail_after(1):
        await model.complete(ask("x [sim:latency=0.01]", model="m", max_tokens=5, call_id="c", attempt=1))


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_simulated_model_calls_each_offered_tool_once_then_answers_from_their_results(anyio_backend):
    model = SimulatedProvider(latency_s=0)
    search = ToolSpec(name="search", description="d", parameters={
        "type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]})
    first = await model.complete(ask("find it", tools=[search, ToolSpec(name="clock", description="d")]))
    assert [(c.name, c.arguments) for c in first.tool_calls] == [("search", '{"query":"find it"}'), ("clock", "{}")]
    assert first.text == ""
    fed_back = ModelRequest(model="m", max_tokens=20, tools=[search], messages=[
        Turn(role="user", content="find it"), Turn(role="assistant", tool_calls=first.tool_calls),
        Turn(role="tool", tool_call_id="sim-call-0", content="found")])
    answer = await model.complete(fed_back)
    assert answer.tool_calls == [] and answer.text.startswith("[simulated m]")


def test_percentiles_are_within_one_percent_of_the_nearest_rank():
    result = percentiles([float(n) for n in range(1, 101)])
    assert result.count == 100
    for got, nearest_rank in ((result.p50_ms, 50.0), (result.p95_ms, 95.0), (result.p99_ms, 99.0)):
        assert abs(got - nearest_rank) <= 0.01 * nearest_rank


def test_without_an_exporter_a_hop_passes_the_incoming_trace_context_on_unchanged():
    from shared import tracing

    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with tracing.consuming("hop", {"traceparent": parent, "Nats-Msg-Id": "x"}, {}):
        assert tracing.inject({}) == {"traceparent": parent}
    assert tracing.inject({}) == {}


def test_without_an_exporter_a_submission_still_starts_a_trace():
    import re

    from shared import tracing

    with tracing.producing("submit", {}):
        header = tracing.inject({})["traceparent"]
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01", header)


def test_a_nats_server_whose_port_is_taken_before_it_binds_starts_on_another(tmp_path, monkeypatch):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = iter([taken.getsockname()[1]])
        real_free_port = stack.free_port
        monkeypatch.setattr(stack, "free_port", lambda: next(ports, None) or real_free_port())
        with stack.nats_server(tmp_path) as url:
            assert url != f"nats://127.0.0.1:{taken.getsockname()[1]}"
            with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=2):
                pass
    assert "address already in use" in (tmp_path / "logs" / "nats-server.log").read_text()


def test_the_delivery_count_is_read_from_either_form_of_ack_subject():
    short = Msg(_client=None, subject="s", reply="$JS.ACK.TASKS.guard.3.120.97.1764215123123456789.5")
    with_domain = Msg(_client=None, subject="s",
                      reply="$JS.ACK.hub.ACCOUNTHASH.TASKS.guard.4.120.97.1764215123123456789.5.token")
    assert (_deliveries(short), _deliveries(with_domain)) == (3, 4)
