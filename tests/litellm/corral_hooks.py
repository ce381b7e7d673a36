"""LiteLLM proxy hooks for Corral's tests: scripted models, answered by LiteLLM's own mock machinery.

Loaded by the proxy (never by Corral), from `litellm_settings.callbacks: corral_hooks.hooks` with this
directory on its PYTHONPATH (tests/model_servers.py does both). Before each call the hook looks at the
model group the client asked for and, for the groups below, puts a `mock_response` in the request (a
whole chat completion, which LiteLLM streams in OpenAI's or Anthropic's format itself) or raises the
error LiteLLM then returns:

    tool-then-text        a call to the first tool offered until the conversation holds a tool result,
                          then the text "The tool said: <that result>"
    tools-then-text       calls of every tool offered, at once, until the conversation holds tool results,
                          then the text "The tools said: <each result, joined by ' | '>"
    once/TOOL             a call to TOOL (offered or not) until the conversation holds a tool result, then
                          "The tool said: <that result>"
    bad-arguments/TOOL    as once/TOOL, with arguments that are not JSON
    always/TOOL           a call to TOOL, every time (whether offered or not)
    rate-limited/SECONDS  HTTP 429 with `Retry-After: SECONDS`

Tool arguments fill the tool's required properties with placeholder values of their types, so they
pass the tool's schema; an `expression` is "6 * 7" and a `url` the proxy's own liveliness endpoint
($CORRAL_TEST_URL), so that Corral's calculator and http_get have something real to do. The proxy needs `use_chat_completions_url_for_anthropic_messages: true` for
`/v1/messages` to serve these mocks (otherwise it sends OpenAI models to the Responses API, where a
request's mock_response is not honoured).
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

from litellm.integrations.custom_logger import CustomLogger
from litellm.proxy._types import ProxyException
from litellm.types.utils import ChatCompletionMessageToolCall, Choices, Function, Message, ModelResponse, Usage

TOOL_THEN_TEXT = "tool-then-text"
TOOLS_THEN_TEXT = "tools-then-text"
ONCE = "once/"
BAD_ARGUMENTS = "bad-arguments/"
ALWAYS = "always/"
RATE_LIMITED = "rate-limited/"
PLACEHOLDERS: dict[str, Any] = {"string": "corral", "integer": 1, "number": 1, "boolean": True, "array": [],
                                "object": {}}


class CorralHooks(CustomLogger):
    async def async_pre_call_hook(self, user_api_key_dict, cache, data: dict, call_type):
        model = str(data.get("model", ""))
        tools = _offered_tools(data.get("tools") or [])
        if model.startswith(RATE_LIMITED):
            seconds = model.removeprefix(RATE_LIMITED)
            raise ProxyException(message=f"rate limited by Corral's test hook: retry after {seconds} s",
                                 type="rate_limit_error", param=None, code=429, headers={"retry-after": seconds})
        if model.startswith(ALWAYS):
            name = model.removeprefix(ALWAYS)
            data["mock_response"] = _tool_call(model, name, tools.get(name, {}))
        elif model == TOOLS_THEN_TEXT:
            results = _tool_results(data.get("messages") or [])
            if results or not tools:
                data["mock_response"] = _text(model, "The tools said: " + " | ".join(results))
            else:
                data["mock_response"] = _tool_calls(model, list(tools.items()))
        elif model.startswith((ONCE, BAD_ARGUMENTS)):
            result = _last_tool_result(data.get("messages") or [])
            name = model.partition("/")[2]
            if result is not None:
                data["mock_response"] = _text(model, f"The tool said: {result}")
            else:
                arguments = "{not json" if model.startswith(BAD_ARGUMENTS) else None
                data["mock_response"] = _tool_call(model, name, tools.get(name, {}), arguments)
        elif model == TOOL_THEN_TEXT:
            result = _last_tool_result(data.get("messages") or [])
            if result is not None or not tools:
                data["mock_response"] = _text(model, f"The tool said: {result}")
            else:
                name, schema = next(iter(tools.items()))
                data["mock_response"] = _tool_call(model, name, schema)
        return data


def _offered_tools(tools: list[dict]) -> dict[str, dict]:
    """Name -> JSON Schema of each tool, from OpenAI's `{"type": "function", "function": {...}}` or
    Anthropic's `{"name", "input_schema"}`."""
    offered = {}
    for tool in tools:
        function = tool.get("function") or tool
        offered[function.get("name", "")] = function.get("parameters") or function.get("input_schema") or {}
    return offered


def _last_tool_result(messages: list[dict]) -> str | None:
    """The content of the conversation's last tool result, or None when it holds none."""
    results = _tool_results(messages)
    return results[-1] if results else None


def _tool_results(messages: list[dict]) -> list[str]:
    """The contents of the conversation's tool results (OpenAI's `tool` messages or Anthropic's
    `tool_result` blocks), in order."""
    found = []
    for message in messages:
        if message.get("role") == "tool":
            found.append(_text_of(message.get("content")))
        elif isinstance(message.get("content"), list):
            for block in message["content"]:
                if isinstance(block, dict) and block.get("type") == "tool_result":
                    found.append(_text_of(block.get("content")))
    return found


def _text_of(content: Any) -> str:
    if isinstance(content, list):
        return "".join(block.get("text", "") for block in content if isinstance(block, dict))
    return "" if content is None else str(content)


def _arguments(schema: dict) -> str:
    properties = schema.get("properties") or {}
    by_name = {"expression": "6 * 7", "url": os.environ.get("CORRAL_TEST_URL", "http://127.0.0.1:9/")}
    return json.dumps({name: by_name.get(name, PLACEHOLDERS.get((properties.get(name) or {}).get("type"), "corral"))
                       for name in schema.get("required") or []})


def _tool_call(model: str, name: str, schema: dict, arguments: str | None = None) -> ModelResponse:
    return _tool_calls(model, [(name, schema)], arguments)


def _tool_calls(model: str, tools: list[tuple[str, dict]], arguments: str | None = None) -> ModelResponse:
    calls = [ChatCompletionMessageToolCall(id=f"call_{uuid.uuid4().hex[:12]}", type="function",
                                           function=Function(name=name, arguments=arguments or _arguments(schema)))
             for name, schema in tools]
    return _response(model, Message(role="assistant", content=None, tool_calls=calls), "tool_calls")


def _text(model: str, text: str) -> ModelResponse:
    return _response(model, Message(role="assistant", content=text), "stop")


def _response(model: str, message: Message, finish_reason: str) -> ModelResponse:
    return ModelResponse(model=model, choices=[Choices(index=0, finish_reason=finish_reason, message=message)],
                         usage=Usage(prompt_tokens=11, completion_tokens=7, total_tokens=18))


hooks = CorralHooks()
