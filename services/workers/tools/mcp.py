"""Tools of MCP servers, over streamable HTTP with the `mcp` SDK's own client.

Each server in `workers.mcp_servers` gets one McpConnection, run for the worker's life by the
Toolbox's task group. It connects (the SDK negotiates the protocol: the stateless 2026-07-28 era
when the server speaks it, else the initialize handshake), lists the server's tools, and keeps
the list current: on a 2026-07-28 server through a `subscriptions/listen` stream for
tools_list_changed (the SDK also hands the notification to the message handler), on an older one
through the `notifications/tools/list_changed` the session hands its message handler, and on both
by listing again every RELIST_EVERY_S, which is also how an idle connection to a server that went
silent is found out. The listen stream is held open, so a server that dies ends it at once.

When the server goes away the SDK's transport fails: the connection's task sees it (its session
ends with the transport's error), calls in flight end with the SDK's "connection closed" error,
and calls made meanwhile find no session; both raise TransientProviderError, which the tool's
breaker counts. The connection then reconnects with capped exponential backoff and lists the
tools again; until then it keeps offering the tools it last listed, so a call reaches the breaker
as a failure instead of the model being told the tool vanished. A call that fails with any other
error of the session (not a tool's own isError) makes the connection list the tools at once: a
session that is broken fails that listing and is opened anew.
"""

from __future__ import annotations

import json
import logging
import random
import re
import time
from collections.abc import Callable
from typing import Any

import anyio
import mcp_types as types
from mcp import Client
from mcp.client import InputRequiredRoundsExceededError
from mcp.client.subscriptions import ListenNotSupportedError
from mcp.shared.exceptions import MCPError
from mcp_types import CONNECTION_CLOSED, INVALID_PARAMS, METHOD_NOT_FOUND
from pydantic import ValidationError

from contracts.events import ToolName
from contracts.policy import McpServer
from services.workers.conversation import ToolSpec
from services.workers.errors import PermanentProviderError, ProviderTimeout, ToolError, TransientProviderError

log = logging.getLogger(__name__)

SERVER_NAME = re.compile(r"^[A-Za-z0-9_.=-]{1,64}$")
"""A server's name is part of its tools' dependency keys (`mcp/SERVER/TOOL`), so of a KV key's alphabet."""
TOOL_NAME = re.compile(ToolName.__metadata__[0].pattern)
"""contracts.events.ToolName: a tool by any other name could not be named by a task."""
LIST_TIMEOUT_S = 10.0
"""Longest the handshake, a tools/list page or a listen acknowledgement may take."""
RELIST_EVERY_S = 60.0
MAX_LIST_PAGES = 50
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 30.0
CLIENT_INFO = types.Implementation(name="corral-worker", version="0.1.0")

State = str
"""`connecting` (first attempt, or again after a failure), `ready` (session open, tools listed), `down`
(waiting to reconnect), `stopped` (it left the policy, or the worker is stopping), `invalid` (its name
cannot be a dependency key: never connected)."""


class SessionEnded(Exception):
    """The server closed the change subscription: the session is started anew."""


class McpTool:
    """One tool of one MCP server, offered to models under the tool's own name."""

    def __init__(self, server: McpConnection, tool: types.Tool) -> None:
        self.server = server
        self.spec = ToolSpec(name=tool.name, description=tool.description or tool.title or "",
                             parameters=dict(tool.input_schema))
        self.dependency = f"mcp/{server.name}/{tool.name}"

    async def run(self, arguments: dict[str, Any]) -> str:
        return await self.server.call(self.spec.name, arguments)


class McpConnection:
    """One MCP server's session, kept open (and opened again) for as long as `run` runs."""

    def __init__(self, name: str, config: McpServer, on_tools: Callable[[], None] = lambda: None, *,
                 backoff_base_s: float = BACKOFF_BASE_S, backoff_max_s: float = BACKOFF_MAX_S,
                 relist_every_s: float = RELIST_EVERY_S) -> None:
        self.name = name
        self.config = config
        self.on_tools = on_tools
        """Called whenever `tools` changes."""
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.relist_every_s = relist_every_s
        self.state: State = "connecting" if SERVER_NAME.fullmatch(name) else "invalid"
        self.tools: dict[str, McpTool] = {}
        self.last_error = "" if self.state != "invalid" else f"the server name {name!r} is not [A-Za-z0-9_.=-]{{1,64}}"
        self.connects = 0
        self.ready_since: float | None = None
        self._client: Client | None = None
        self._check = anyio.Event()
        """Set to list the tools now: the server said they changed, or a call found the session broken."""
        self._skipped: set[str] = set()

    async def run(self) -> None:
        """Connect, list, follow changes; on any failure wait (capped backoff) and start again. Runs until cancelled."""
        if self.state == "invalid":
            log.error("MCP server %s: %s; not connected", self.name, self.last_error)
            return
        try:
            await self._reconnecting()
        finally:
            self.state, self.ready_since = "stopped", None

    async def _reconnecting(self) -> None:
        failures = 0
        while True:
            self.state = "connecting"
            error = "the session ended"
            try:
                await self._session()
            except Exception as exc:  # a failed transport arrives as an ExceptionGroup of its task group
                error = _describe(exc)
            was_ready = self.ready_since is not None
            repeated = error == self.last_error
            self.state, self.ready_since, self.last_error = "down", None, error
            failures = 1 if was_ready else failures + 1
            delay = min(self.backoff_max_s, self.backoff_base_s * 2 ** (failures - 1)) * random.uniform(0.5, 1.0)
            log.log(logging.DEBUG if repeated and not was_ready else logging.WARNING,
                    "MCP server %s (%s): %s; connecting again in %.1f s", self.name, self.config.url, error, delay)
            await anyio.sleep(delay)

    async def _session(self) -> None:
        async with Client(self.config.url, cache=None, read_timeout_seconds=LIST_TIMEOUT_S,
                          message_handler=self._on_message, client_info=CLIENT_INFO) as client:
            try:
                self._check = anyio.Event()
                await self._list(client)
                self._client, self.state, self.ready_since = client, "ready", time.time()
                self.connects += 1
                log.info("MCP server %s: connected (protocol %s), %d tools", self.name, client.protocol_version,
                         len(self.tools))
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._listen, client)
                    while True:
                        with anyio.move_on_after(self.relist_every_s):
                            await self._check.wait()
                        self._check = anyio.Event()
                        await self._list(client)
            finally:
                self._client = None

    async def _listen(self, client: Client) -> None:
        """Follow a 2026-07-28 server's tools_list_changed; returns at once if it offers no such stream."""
        try:
            async with client.listen(tools_list_changed=True) as subscription:
                if not subscription.honored.tools_list_changed:
                    return
                async for _ in subscription:
                    self._check.set()
        except ListenNotSupportedError:  # the handshake era: changes come to _on_message
            return
        except MCPError as exc:
            if exc.code != METHOD_NOT_FOUND:
                raise
            return  # no subscriptions here: the periodic listing has to do
        raise SessionEnded("the server closed the change subscription")

    async def _on_message(self, message: Any) -> None:
        if isinstance(message, types.ToolListChangedNotification):
            self._check.set()
        elif isinstance(message, Exception):
            log.debug("MCP server %s: transport said %s", self.name, _describe(message))

    async def _list(self, client: Client) -> None:
        listed: list[types.Tool] = []
        cursor: str | None = None
        for _ in range(MAX_LIST_PAGES):
            page = await client.list_tools(cursor=cursor)
            listed.extend(page.tools)
            if not (cursor := page.next_cursor):
                break
        tools: dict[str, McpTool] = {}
        for tool in listed:
            if not TOOL_NAME.fullmatch(tool.name):
                if tool.name not in self._skipped:
                    self._skipped.add(tool.name)
                    log.warning("MCP server %s: tool %r not offered: a tool name is [A-Za-z0-9_-]{1,64}", self.name,
                                tool.name[:100])
                continue
            tools.setdefault(tool.name, McpTool(self, tool))
        if {n: t.spec for n, t in tools.items()} != {n: t.spec for n, t in self.tools.items()}:
            self.tools = tools
            self.on_tools()

    async def call(self, tool: str, arguments: dict[str, Any]) -> str:
        """Call `tool` with `arguments` and return its text; the module's docstring says what it raises."""
        if not isinstance(arguments, dict):
            raise ToolError(f"the arguments of {tool} are a JSON object, not {type(arguments).__name__}")
        client = self._client
        where = f"mcp/{self.name}/{tool}"
        if client is None:
            why = self.last_error or "not connected yet"
            raise TransientProviderError(f"MCP server {self.name} is {self.state}: {why}")
        timeout = self.config.timeout_s
        try:
            with anyio.fail_after(timeout):
                result = await client.call_tool(tool, arguments, read_timeout_seconds=timeout + 1)
        except TimeoutError:
            raise ProviderTimeout(f"{where} took longer than {timeout:g} s") from None
        except MCPError as exc:
            if exc.code in (INVALID_PARAMS, METHOD_NOT_FOUND):  # it judged the call, not the session
                raise ToolError(f"{where} refused the call: {exc.message}") from None
            self._check.set()  # listing again tells a broken session from a passing error
            what = "connection lost" if exc.code == CONNECTION_CLOSED else f"error {exc.code}"
            raise TransientProviderError(f"{where}: {what}: {exc.message}") from None
        except ValidationError as exc:
            raise PermanentProviderError(f"{where} answered with a malformed result: {exc.error_count()} errors") \
                from None
        except InputRequiredRoundsExceededError:
            raise ToolError(f"{where} kept asking for input a worker cannot give") from None
        except (anyio.ClosedResourceError, anyio.BrokenResourceError, RuntimeError) as exc:  # RuntimeError: closed
            self._check.set()
            raise TransientProviderError(f"{where}: the session is gone: {_describe(exc)}") from None
        text = _text_of(result)
        if result.is_error:
            raise ToolError(text or f"{tool} failed and said nothing")
        return text

    def stats(self) -> dict[str, Any]:
        return {"url": self.config.url, "state": self.state, "tools": len(self.tools), "last_error": self.last_error,
                "connects": self.connects, "ready_since": self.ready_since}


def _text_of(result: types.CallToolResult) -> str:
    """Text blocks as they are, one a line; anything else named in brackets; structured content as JSON if
    there is nothing else."""
    parts: list[str] = []
    for block in result.content:
        match block:
            case types.TextContent(text=text):
                parts.append(text)
            case types.ImageContent(mime_type=mime):
                parts.append(f"[image {mime}]")
            case types.AudioContent(mime_type=mime):
                parts.append(f"[audio {mime}]")
            case types.ResourceLink(uri=uri):
                parts.append(f"[resource link {uri}]")
            case types.EmbeddedResource(resource=types.TextResourceContents(text=text)):
                parts.append(text)
            case types.EmbeddedResource(resource=resource):
                parts.append(f"[resource {resource.uri}]")
            case _:
                parts.append(f"[{getattr(block, 'type', type(block).__name__)}]")
    if not parts and result.structured_content is not None:
        parts.append(json.dumps(result.structured_content, ensure_ascii=False, sort_keys=True))
    return "\n".join(parts)


def _describe(exc: BaseException) -> str:
    """The first real error inside any exception groups, as `Type: message`, on one short line."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= 300 else text[:299] + "…"
