"""OpenAI's chat completions protocol, streamed: OpenAI itself, and the servers that speak it (llama.cpp,
vLLM, Ollama, LiteLLM and most gateways).

Each call POSTs `{base_url}/chat/completions` with `stream: true` and asks for the usage in the last chunk
(`stream_options.include_usage`). Text deltas go to `on_text` as they come; tool-call deltas are put
together by their index (the first fragment brings the id and the name, later ones more of the arguments).
A server that reports no usage is counted with tiktoken, and the usage says it was estimated.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

from contracts.events import Usage
from contracts.policy import ProviderConfig
from services.workers.conversation import Completion, ModelRequest, OnText, ToolCall, Turn
from services.workers.errors import TransientProviderError
from services.workers.providers.http import Api, ErrorDetail, ErrorReport, SseEvent, class_for_kind, report_of
from services.workers.providers.usage import usage_of

SYSTEM = "openai"
DONE = b"[DONE]"
TOOL_ERROR_PREFIX = "Error: "
"""OpenAI's tool messages have no error flag: a failed tool's text says so itself."""


class _FunctionDelta(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class _ToolCallDelta(msgspec.Struct):
    index: int = 0
    """Which call a fragment belongs to, in a stream."""
    id: str | None = None
    function: _FunctionDelta | None = None


class _Delta(msgspec.Struct):
    content: str | None = None
    tool_calls: list[_ToolCallDelta] | None = None


class _Choice(msgspec.Struct):
    index: int = 0
    delta: _Delta | None = None
    message: _Delta | None = None
    """In an answer that came whole (a server that did not stream), in place of `delta`."""
    finish_reason: str | None = None


class _PromptDetails(msgspec.Struct):
    cached_tokens: int | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    prompt_tokens_details: _PromptDetails | None = None


class _Chunk(msgspec.Struct):
    """One chunk of a streamed answer, or an answer that came whole; or an error (a chunk with `error`)."""

    model: str | None = None
    choices: list[_Choice] | None = None
    usage: _Usage | None = None
    error: ErrorDetail | str | None = None


_chunk = msgspec.json.Decoder(_Chunk)


class _PartialCall:
    def __init__(self) -> None:
        self.id = ""
        self.name = ""
        self.arguments: list[str] = []

    def tool_call(self, index: int) -> ToolCall:
        """The call; one a server gave no id (some local ones) gets `call_INDEX`, for its result to answer."""
        return ToolCall(id=self.id or f"call_{index}", name=self.name, arguments="".join(self.arguments) or "{}")


class _Answer:
    """One call's answer as it streams in."""

    def __init__(self, request: ModelRequest, on_text: OnText | None, started: float) -> None:
        self.request = request
        self.on_text = on_text
        self.started = started
        self.text: list[str] = []
        self.calls: dict[int, _PartialCall] = {}
        self.usage: _Usage | None = None
        self.model = ""
        self.finish_reason = ""
        self.first_token_s: float | None = None

    def on_event(self, event: SseEvent) -> bool:
        if event.data.strip() == DONE:
            return True
        self.take(_decode(event.data))
        return False

    def on_whole(self, body: bytes) -> None:
        self.take(_decode(body))

    def take(self, chunk: _Chunk) -> None:
        if chunk.error is not None:
            report = report_of(chunk.error) or ErrorReport("no message", "")
            raise class_for_kind(report.kind)(f"an error in the stream: {report.message}")
        self.model = chunk.model or self.model
        self.usage = chunk.usage or self.usage
        for choice in chunk.choices or []:
            if choice.index != 0:
                continue  # we ask for one choice (n = 1)
            self.finish_reason = choice.finish_reason or self.finish_reason
            delta = choice.delta or choice.message
            if delta is None:
                continue
            if delta.content:
                self._token()
                self.text.append(delta.content)
                if self.on_text is not None:
                    self.on_text(delta.content)
            for position, part in enumerate(delta.tool_calls or []):
                self._token()
                # a whole answer's tool calls have no index: they come in order, each whole
                call = self.calls.setdefault(part.index if choice.delta is not None else position, _PartialCall())
                call.id = part.id or call.id
                if part.function is not None:
                    call.name = part.function.name or call.name
                    if part.function.arguments:
                        call.arguments.append(part.function.arguments)

    def _token(self) -> None:
        if self.first_token_s is None:
            self.first_token_s = time.perf_counter() - self.started

    def completion(self) -> Completion:
        text = "".join(self.text)
        calls = [self.calls[index].tool_call(index) for index in sorted(self.calls)]
        return Completion(text=text, usage=self._usage(text, calls), tool_calls=calls,
                          finish_reason=self.finish_reason, response_model=self.model,
                          first_token_s=self.first_token_s)

    def _usage(self, text: str, calls: list[ToolCall]) -> Usage:
        usage = self.usage or _Usage()
        details = usage.prompt_tokens_details
        return usage_of(self.request, text, calls, input_tokens=usage.prompt_tokens,
                        output_tokens=usage.completion_tokens, cached_tokens=details.cached_tokens if details else None)


def _decode(data: bytes) -> _Chunk:
    try:
        return _chunk.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as error:
        raise TransientProviderError(f"a malformed chunk in the answer: {error}") from None


class OpenAIProvider:
    """A model API speaking OpenAI's chat completions."""

    system = SYSTEM

    def __init__(self, name: str, config: ProviderConfig, base_url: str) -> None:
        self.name = name
        self.api = Api(name, config, base_url, lambda key: {"Authorization": f"Bearer {key}"})

    def __repr__(self) -> str:
        return f"<OpenAIProvider {self.api!r}>"

    async def aclose(self) -> None:
        await self.api.aclose()

    async def complete(self, request: ModelRequest, on_text: OnText | None = None) -> Completion:
        body: dict[str, Any] = {
            "model": request.model, "messages": [_message(turn) for turn in request.messages],
            "max_tokens": request.max_tokens, "stream": True, "stream_options": {"include_usage": True}}
        if request.tools:
            body["tools"] = [{"type": "function", "function": {
                "name": tool.name, "description": tool.description, "parameters": tool.parameters}}
                for tool in request.tools]
        answer = _Answer(request, on_text, time.perf_counter())
        await self.api.exchange("chat/completions", body, answer.on_event, answer.on_whole)
        return answer.completion()


def _message(turn: Turn) -> dict[str, Any]:
    if turn.role == "tool":
        content = f"{TOOL_ERROR_PREFIX}{turn.content}" if turn.is_error else turn.content
        return {"role": "tool", "tool_call_id": turn.tool_call_id, "content": content}
    message: dict[str, Any] = {"role": turn.role, "content": turn.content}
    if turn.role == "assistant" and turn.tool_calls:
        message["content"] = turn.content or None
        message["tool_calls"] = [{"id": call.id, "type": "function",
                                  "function": {"name": call.name, "arguments": call.arguments}}
                                 for call in turn.tool_calls]
    return message

