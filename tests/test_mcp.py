"""MCP tools: a Toolbox against tests/mcp_server.py, run as its own process on a free loopback port."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest

from contracts.policy import McpServer, WorkerSettings
from services.stack import free_port
from services.workers.errors import ProviderTimeout, ToolError, TransientProviderError
from services.workers.tools import Toolbox
from tests.test_tools import eventually
from tests.test_tools import maintained as toolbox_following

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

SERVER = Path(__file__).with_name("mcp_server.py")


class ServerProcess:
    """tests/mcp_server.py on one port, which it keeps across a kill and a start."""

    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        self.log = log
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen([sys.executable, str(SERVER), "--port", str(self.port)], stdout=log,
                                            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while True:  # until it accepts connections
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{SERVER.name} did not start: {self.log.read_text()[-2000:]}") from None
                time.sleep(0.05)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


def server_process(log: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(log)
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for the tests that only list and call (none of them changes its tools)."""
    yield from server_process(tmp_path_factory.mktemp("mcp") / "server.log")


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A server for one test, which may change its tools, kill it or start it again."""
    yield from server_process(tmp_path / "server.log")


def policy(*servers: tuple[str, str], timeout_s: float = 10.0) -> WorkerSettings:
    return WorkerSettings(mcp_servers={name: McpServer(url=url, timeout_s=timeout_s) for name, url in servers})


def maintained(settings: Callable[[], WorkerSettings]):
    return toolbox_following(settings, poll_s=0.05, reconnect_max_s=0.5)


def state(toolbox: Toolbox, server: str) -> dict:
    return toolbox.stats()["mcp_servers"].get(server, {})


async def test_a_servers_tools_are_offered_under_their_own_names_as_dependencies_of_that_server(
        shared_server: ServerProcess) -> None:
    async with maintained(lambda: policy(("tools", shared_server.url))) as toolbox:
        await eventually(lambda: toolbox.get("lookup"))
        lookup = toolbox.get("lookup")
        assert lookup.dependency == "mcp/tools/lookup"
        assert lookup.spec.description == "Look a key up."
        assert lookup.spec.parameters["properties"]["key"]["type"] == "string"
        assert lookup.spec.parameters["required"] == ["key"]
        assert {"lookup", "fail", "slow", "picture", "enable_extra"} <= set(toolbox.names())
        assert "bad name!" not in toolbox.names()  # not a ToolName: skipped
        assert toolbox.get("calculator").dependency == "tool/calculator"  # a built-in wins over an MCP tool
        assert state(toolbox, "tools") | {"ready_since": None} == {
            "url": shared_server.url, "state": "ready", "tools": 6, "last_error": "", "connects": 1,
            "ready_since": None}


async def test_a_call_answers_with_the_tools_text_and_names_what_is_not_text(shared_server: ServerProcess) -> None:
    async with maintained(lambda: policy(("tools", shared_server.url))) as toolbox:
        await eventually(lambda: toolbox.get("picture"))
        assert await toolbox.get("lookup").run({"key": "colour"}) == "value of colour"
        assert await toolbox.get("picture").run({}) == "a caption\n[image image/png]"


async def test_a_tool_that_answers_with_an_error_raises_tool_error_and_the_session_goes_on(
        shared_server: ServerProcess) -> None:
    async with maintained(lambda: policy(("tools", shared_server.url))) as toolbox:
        await eventually(lambda: toolbox.get("fail"))
        with pytest.raises(ToolError, match="no such colour"):
            await toolbox.get("fail").run({"reason": "no such colour"})
        with pytest.raises(ToolError, match="Input should be a valid string"):  # the server checks the types
            await toolbox.get("lookup").run({"key": 3})
        with pytest.raises(ToolError, match="JSON object, not list"):
            await toolbox.get("lookup").run(["colour"])  # type: ignore[arg-type]
        assert await toolbox.get("lookup").run({"key": "k"}) == "value of k"
        assert state(toolbox, "tools")["connects"] == 1


async def test_a_call_longer_than_the_servers_timeout_raises_provider_timeout(shared_server: ServerProcess) -> None:
    async with maintained(lambda: policy(("tools", shared_server.url), timeout_s=0.5)) as toolbox:
        await eventually(lambda: toolbox.get("slow"))
        began = time.monotonic()
        with pytest.raises(ProviderTimeout, match="mcp/tools/slow took longer than 0.5 s"):
            await toolbox.get("slow").run({"seconds": 10})
        assert time.monotonic() - began < 2
        assert await toolbox.get("slow").run({"seconds": 0.01}) == "slept"  # the session survived the abandon


async def test_the_first_server_in_the_policy_has_a_name_both_offer(shared_server: ServerProcess) -> None:
    async with maintained(lambda: policy(("zeta", shared_server.url), ("alpha", shared_server.url))) as toolbox:
        await eventually(lambda: state(toolbox, "zeta").get("state") == state(toolbox, "alpha").get("state") == "ready")
        assert toolbox.get("lookup").dependency == "mcp/zeta/lookup"
        assert state(toolbox, "alpha")["tools"] == 6  # listed, but its names are taken


async def test_servers_added_to_or_removed_from_the_live_policy_bring_or_take_their_tools(
        shared_server: ServerProcess) -> None:
    settings = WorkerSettings()
    async with maintained(lambda: settings) as toolbox:
        assert toolbox.get("lookup") is None
        settings = policy(("tools", shared_server.url))
        await eventually(lambda: toolbox.get("lookup"))
        settings = WorkerSettings()
        await eventually(lambda: toolbox.get("lookup") is None)
        assert toolbox.stats()["mcp_servers"] == {}
        assert toolbox.get("calculator") is not None


async def test_a_tool_the_server_adds_at_run_time_is_offered(own_server: ServerProcess) -> None:
    async with maintained(lambda: policy(("tools", own_server.url))) as toolbox:
        await eventually(lambda: toolbox.get("enable_extra"))
        assert toolbox.get("extra") is None
        assert await toolbox.get("enable_extra").run({}) == "extra enabled"
        await eventually(lambda: toolbox.get("extra"), timeout=5)  # well before the periodic listing
        assert await toolbox.get("extra").run({}) == "extra here"
        assert state(toolbox, "tools")["tools"] == 7


@pytest.mark.fault
async def test_a_killed_server_fails_calls_transiently_and_once_restarted_it_is_called_again(
        own_server: ServerProcess) -> None:
    async with maintained(lambda: policy(("tools", own_server.url))) as toolbox:
        await eventually(lambda: toolbox.get("lookup"))
        in_flight: list[BaseException] = []

        async def call_slow() -> None:
            try:
                await toolbox.get("slow").run({"seconds": 30})
            except Exception as exc:
                in_flight.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(call_slow)
            await anyio.sleep(0.2)  # likely in flight by then; sent or not, the assertion below holds
            own_server.kill()
        assert len(in_flight) == 1 and isinstance(in_flight[0], TransientProviderError), in_flight
        with pytest.raises(TransientProviderError, match="mcp/tools/lookup: connection lost|MCP server tools is"):
            await toolbox.get("lookup").run({"key": "k"})
        await eventually(lambda: "ConnectError" in state(toolbox, "tools")["last_error"])  # it tries again
        with pytest.raises(TransientProviderError, match="MCP server tools is (down|connecting): .*ConnectError"):
            await toolbox.get("lookup").run({"key": "k"})  # still offered: the breaker counts the failures
        assert await toolbox.get("calculator").run({"expression": "6 * 7"}) == "42"

        own_server.start()
        await eventually(lambda: state(toolbox, "tools").get("connects") == 2)
        assert state(toolbox, "tools")["state"] == "ready"
        assert await toolbox.get("lookup").run({"key": "k"}) == "value of k"
