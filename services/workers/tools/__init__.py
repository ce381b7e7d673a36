"""The tools an agent worker offers its models: built-ins, plug-ins and the tools of MCP servers.

Built-ins and plug-ins register a factory by name (`register`); a plug-in is a module named in the
policy's `workers.tool_plugins` that calls `register` when imported:

    from services.workers.tools import register

    class Weather:
        spec = ToolSpec(name="weather", description="...", parameters={...})
        dependency = "tool/weather"
        async def run(self, arguments): ...

    register("weather", lambda settings: Weather())

A Toolbox follows the live policy for one worker: it imports the plug-ins the policy names, builds
every registered tool from the current WorkerSettings, and keeps a session to every MCP server
the policy names (services.workers.tools.mcp). `get(name)` is what the agent loop calls.

Names: a built-in or plug-in wins over an MCP tool of the same name, and an MCP server earlier in
the policy over a later one; the loser is not offered, and that is logged once.
A plug-in that leaves the policy keeps its tools until the worker restarts (a module cannot be
unimported); an MCP server that leaves it takes its tools with it at once.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from typing import Any

import anyio
from anyio.abc import TaskGroup

from contracts.policy import McpServer, WorkerSettings
from services.workers.conversation import Tool
from services.workers.tools.calculator import NAME as CALCULATOR, Calculator
from services.workers.tools.http_get import NAME as HTTP_GET, HttpGet
from services.workers.tools.mcp import BACKOFF_MAX_S, RELIST_EVERY_S, TOOL_NAME, McpConnection
from shared.errors import ConfigError

log = logging.getLogger(__name__)

ToolFactory = Callable[[WorkerSettings], Tool]
"""Builds a tool from the workers' settings of the current policy (called again whenever they change)."""

POLL_S = 1.0
"""How often a Toolbox looks at the policy for servers and plug-ins that came or went."""


class DuplicateTool(ConfigError):
    """Two different factories were registered under one tool name."""


_factories: dict[str, ToolFactory] = {}
_generation = 0
"""Counts registrations, so a Toolbox knows to build the tools again."""


def _describe(factory: Callable[..., Any]) -> str:
    return f"{getattr(factory, '__module__', '?')}.{getattr(factory, '__qualname__', repr(factory))}"


def register(name: str, factory: ToolFactory) -> None:
    """Offer the tool `factory` builds as `name`, in every Toolbox of this process. Registering the same factory
    again (a module imported twice) does nothing; a different one under a taken name is a DuplicateTool."""
    global _generation
    if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
        raise ValueError(f"a tool's name is [A-Za-z0-9_-]{{1,64}}, not {name!r}")
    existing = _factories.get(name)
    if existing is not None and existing != factory and _describe(existing) != _describe(factory):
        raise DuplicateTool(f"tool {name!r} is registered twice: by {_describe(existing)} and by {_describe(factory)}")
    _factories[name] = factory
    _generation += 1


def registered() -> list[str]:
    return sorted(_factories)


register(CALCULATOR, Calculator.from_settings)
register(HTTP_GET, HttpGet.from_settings)


class Toolbox:
    """One worker's tools, kept current by `maintain`. Built-ins and the plug-ins the settings name are offered
    from construction on; MCP tools once `maintain` has listed their server. `settings` is the live policy's
    WorkerSettings, read about every `poll_s`."""

    def __init__(self, settings: Callable[[], WorkerSettings], *, poll_s: float = POLL_S,
                 reconnect_max_s: float = BACKOFF_MAX_S, relist_every_s: float = RELIST_EVERY_S) -> None:
        self._settings = settings
        self.poll_s = poll_s
        self.reconnect_max_s = reconnect_max_s
        self.relist_every_s = relist_every_s
        self._local: dict[str, Tool] = {}
        self._built_from: tuple[WorkerSettings, int] | None = None
        self._servers: dict[str, tuple[McpConnection, anyio.CancelScope]] = {}
        self._order: list[str] = []
        """The servers' names in the policy's order: the first to list a name has it."""
        self._plugins: dict[str, str] = {}
        """Plug-in modules tried, each with "" (imported) or why its import failed."""
        self._index: dict[str, Tool] = {}
        self._logged: set[tuple[str, ...]] = set()
        self._refresh(self._settings(), None)

    async def maintain(self, stop: anyio.Event) -> None:
        """Follow the policy until `stop`: plug-ins, tools built from the current settings, one McpConnection per
        server (started, restarted when its entry changes, cancelled when it leaves)."""
        async with anyio.create_task_group() as tg:
            while not stop.is_set():
                try:
                    settings = self._settings()
                except Exception as exc:  # no policy to follow this time: keep what there is
                    self._once(("settings", str(exc)), logging.ERROR, "tools: cannot read the settings: %s", exc)
                else:
                    self._refresh(settings, tg)
                with anyio.move_on_after(self.poll_s):
                    await stop.wait()
            tg.cancel_scope.cancel()

    def get(self, name: str) -> Tool | None:
        return self._index.get(name)

    def names(self) -> list[str]:
        return sorted(self._index)

    def stats(self) -> dict[str, Any]:
        """For the worker's $SRV.STATS: the tools offered, the plug-ins tried, each MCP server's state."""
        return {"tools": self.names(),
                "plugins": {name: error or "imported" for name, error in self._plugins.items()},
                "mcp_servers": {name: connection.stats() for name, (connection, _) in self._servers.items()}}

    def _refresh(self, settings: WorkerSettings, tg: TaskGroup | None) -> None:
        self._import_plugins(settings.tool_plugins)
        if self._built_from != (settings, _generation):
            self._build_local(settings)
        if tg is not None:
            self._follow_servers(settings.mcp_servers, tg)
        self._reindex()

    def _import_plugins(self, modules: list[str]) -> None:
        for module in modules:
            if module in self._plugins:
                continue
            try:
                importlib.import_module(module)
            except (Exception, SystemExit) as exc:  # whatever a plug-in does wrong, the worker goes on without it
                self._plugins[module] = f"{type(exc).__name__}: {exc}"
                log.error("tool plug-in %s not loaded: %s: %s", module, type(exc).__name__, exc)
            else:
                self._plugins[module] = ""
                log.info("tool plug-in %s imported", module)

    def _build_local(self, settings: WorkerSettings) -> None:
        tools: dict[str, Tool] = {}
        for name, factory in _factories.items():
            try:
                tool = factory(settings)
                if tool.spec.name != name:
                    raise ValueError(f"it built a tool named {tool.spec.name!r}")
            except Exception as exc:
                self._once(("factory", name, str(exc)), logging.ERROR, "tool %s (%s) not offered: %s: %s", name,
                           _describe(factory), type(exc).__name__, exc)
                continue
            tools[name] = tool
        self._local, self._built_from = tools, (settings, _generation)

    def _follow_servers(self, servers: dict[str, McpServer], tg: TaskGroup) -> None:
        self._order = list(servers)
        for name in [n for n, (connection, _) in self._servers.items() if servers.get(n) != connection.config]:
            connection, scope = self._servers.pop(name)
            scope.cancel()
            log.info("MCP server %s: %s", name, "left the policy" if name not in servers else "changed; reconnecting")
        for name, config in servers.items():
            if name not in self._servers:
                connection = McpConnection(name, config, self._reindex, backoff_max_s=self.reconnect_max_s,
                                           relist_every_s=self.relist_every_s)
                scope = anyio.CancelScope()
                self._servers[name] = (connection, scope)
                tg.start_soon(self._run_connection, connection, scope)

    async def _run_connection(self, connection: McpConnection, scope: anyio.CancelScope) -> None:
        with scope:
            await connection.run()

    def _reindex(self) -> None:
        index = dict(self._local)
        for server in self._order:
            if server not in self._servers:
                continue
            for name, tool in self._servers[server][0].tools.items():
                holder = index.get(name)
                if holder is None:
                    index[name] = tool
                else:
                    self._once(("clash", tool.dependency, holder.dependency), logging.WARNING,
                               "MCP tool %s not offered: %s has the name %r", tool.dependency, holder.dependency, name)
        self._index = index

    def _once(self, key: tuple[str, ...], level: int, message: str, *args: Any) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.log(level, message, *args)
