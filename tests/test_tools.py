"""The workers' built-in tools, the registry and plug-ins (no server process: http_get fetches from loopback
HTTP servers these tests run in threads). MCP tools: tests/test_mcp.py."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import asynccontextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import anyio
import httpx
import msgspec
import pytest

from contracts.policy import McpServer, WorkerSettings
from services.stack import free_port
from services.workers import tools
from services.workers.errors import ProviderTimeout, ToolError, TransientProviderError
from services.workers.tools import DuplicateTool, Toolbox, register
from services.workers.tools.calculator import MAX_EXPRESSION_CHARS, evaluate
from services.workers.tools.http_get import MAX_BODY_BYTES, HttpGet

pytestmark = pytest.mark.anyio


async def calculate(expression: str) -> str:
    return await Toolbox(WorkerSettings).get("calculator").run({"expression": expression})


# --- calculator ---

@pytest.mark.parametrize(("expression", "answer"), [
    ("1 + 2 * 3", "7"), ("(1 + 2) * 3", "9"), ("2 ** 10", "1024"), ("2 ** 3 ** 2", "512"), ("-2 ** 2", "-4"),
    ("7 / 2", "3.5"), ("7 // 2", "3"), ("-7 // 2", "-4"), ("-7 % 3", "2"), ("+-+1", "-1"),
    ("0.1 + 0.2", "0.30000000000000004"), ("1+" * 400 + "1", "401"),
    ("sqrt(16) + log(e) + cos(0)", "6.0"), ("round(sin(pi / 2), 6)", "1.0"), ("log(8, 2)", "3.0"),
    ("max(3, 9, 4) - min(3, 9, 4)", "6"), ("factorial(20)", "2432902008176640000"), ("abs(-2.5)", "2.5"),
    ("2 ** -1", "0.5"), ("10 ** 30", "1" + "0" * 30), ("1e3", "1000.0"), (" 4 ", "4"),
])
async def test_the_calculator_computes_arithmetic_and_math_functions(expression: str, answer: str) -> None:
    assert await calculate(expression) == answer


@pytest.mark.parametrize(("expression", "says"), [
    ("__import__('os').system('x')", "only these functions can be called"),
    ("open('/etc/passwd')", "unknown function 'open'"),
    ("(1).__class__", "attribute access is not allowed"),
    ("math.pi", "attribute access is not allowed"),
    ("x + 1", "unknown name 'x'"),
    ("9**9**9", "too large"),
    ("(2**4000) * (2**4000)", "too large"),
    ("factorial(10**6)", "factorial takes a whole number within"),
    ("10.0 ** 400", "too large for a floating-point number"),
    ("1e999", "not a finite number"),
    ("(" * 10_000 + "1" + ")" * 10_000, "too long"),
    ("(" * 300 + "1" + ")" * 300, "not an arithmetic expression"),
    ("-" * 500 + "1", "too deeply nested"),
    ("1" * 100_000, "too long"),
    ("'a' * 3", "only numbers are allowed"),
    ("[1, 2]", "List is not allowed"),
    ("lambda: 1", "Lambda is not allowed"),
    ("1 if 1 else 2", "IfExp is not allowed"),
    ("1 < 2", "Compare is not allowed"),
    ("True + 1", "only numbers are allowed"),
    ("1j * 1j", "only numbers are allowed"),
    ("(-8) ** (1 / 3)", "complex number"),
    ("1 / 0", "division by zero"),
    ("5 % 0", "division by zero"),
    ("sqrt(-1)", "cannot compute it: math domain error"),
    ("sqrt(1, 2)", "cannot compute it"),
    ("max(*[1])", "plain positional arguments"),
    ("round(1.5, ndigits=1)", "plain positional arguments"),
    ("1 +", "not an arithmetic expression"),
    ("1\x00", "not an arithmetic expression"),
    ("", "empty"),
])
async def test_the_calculator_refuses_hostile_or_bad_input_quickly_with_a_clear_message(expression: str,
                                                                                        says: str) -> None:
    began = time.monotonic()
    with pytest.raises(ToolError, match=re.escape(says)):
        await calculate(expression)
    assert time.monotonic() - began < 0.5


async def test_the_calculator_refuses_arguments_that_are_not_one_expression_string() -> None:
    calculator = Toolbox(WorkerSettings).get("calculator")
    with pytest.raises(ToolError, match="expression must be a string, not int"):
        await calculator.run({"expression": 42})
    with pytest.raises(ToolError, match="calculator takes"):
        await calculator.run({"expr": "1"})
    with pytest.raises(ToolError, match="calculator takes"):
        await calculator.run(["1 + 1"])  # type: ignore[arg-type]
    with pytest.raises(ToolError, match=f"at most {MAX_EXPRESSION_CHARS}"):
        evaluate("1+" * MAX_EXPRESSION_CHARS + "1")


# --- http_get against loopback servers ---

class Site(ThreadingHTTPServer):
    """A loopback HTTP server in a thread; `hits` counts every request it was sent."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, routes: dict[str, Callable[[BaseHTTPRequestHandler], None]]) -> None:
        self.routes = routes
        self.hits = 0
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
                site.hits += 1
                site.routes.get(self.path, lambda h: answer(h, 404, b"no such page"))(self)

            def log_message(self, format: str, *args) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.port = self.server_address[1]
        self.host = f"127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)

    def url(self, path: str) -> str:
        return f"http://{self.host}{path}"


def answer(handler: BaseHTTPRequestHandler, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8",
           headers: dict[str, str] | None = None) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.end_headers()
    try:
        handler.wfile.write(body)
    except (BrokenPipeError, ConnectionResetError):  # the client stopped reading, as a capped read does
        pass


def redirect(location: str) -> Callable[[BaseHTTPRequestHandler], None]:
    return lambda h: answer(h, 302, b"", headers={"Location": location})


def stall(handler: BaseHTTPRequestHandler) -> None:
    time.sleep(3)
    answer(handler, 200, b"too late")


@pytest.fixture
def sites() -> Iterator[tuple[Site, Site]]:
    """An allowed site and one that is not (`other`), which the allowed one redirects to."""
    other = Site({"/": lambda h: answer(h, 200, b"the other site")})
    site = Site({
        "/hello": lambda h: answer(h, 200, "héllo".encode()),
        "/json": lambda h: answer(h, 200, b'{"a": 1}', "application/json"),
        "/image": lambda h: answer(h, 200, b"\x89PNG" * 10, "image/png"),
        "/big": lambda h: answer(h, 200, b"x" * (3 * MAX_BODY_BYTES)),
        "/down": lambda h: answer(h, 503, b"overloaded"),
        "/stall": stall,
        "/redirect-in": redirect("/hello"),
        "/redirect-out": redirect(other.url("/")),
        "/redirect-ftp": redirect("ftp://example.com/"),
        "/loop": redirect("/loop"),
    })
    for server in (site, other):
        server.thread.start()
    yield site, other
    for server in (site, other):
        server.shutdown()
        server.server_close()


def fetcher(*hosts: str, timeout_s: float = 5.0) -> HttpGet:
    return HttpGet(list(hosts), timeout_s=timeout_s)


async def test_http_get_returns_status_content_type_and_body_from_an_allowed_host(sites: tuple[Site, Site]) -> None:
    site, _ = sites
    http_get = Toolbox(lambda: WorkerSettings(http_allowed_hosts=[site.host])).get("http_get")
    assert await http_get.run({"url": site.url("/hello")}) == \
        "HTTP 200 OK\ncontent-type: text/plain; charset=utf-8\n\nhéllo"
    assert (await http_get.run({"url": site.url("/json")})).endswith('\n\n{"a": 1}')
    assert (await http_get.run({"url": site.url("/image")})).endswith("[40 bytes of image/png, not shown]")
    assert http_get.dependency == "tool/http_get"


async def test_http_get_refuses_a_host_not_allowed_without_connecting_and_says_which_are(
        sites: tuple[Site, Site]) -> None:
    site, other = sites
    with pytest.raises(ToolError, match=rf"host {other.host} is not allowed; allowed hosts: {site.host}"):
        await fetcher(site.host).run({"url": other.url("/")})
    with pytest.raises(ToolError, match="allowed hosts: none"):
        await fetcher().run({"url": other.url("/")})
    with pytest.raises(ToolError, match=rf"host {other.host} is not allowed; allowed hosts: 127.0.0.1$"):
        await fetcher("127.0.0.1").run({"url": other.url("/")})  # a bare name allows the default port only
    assert other.hits == 0


def test_an_allowed_host_is_its_name_on_the_default_port_or_name_and_port() -> None:
    fetcher("example.com").check(httpx.URL("https://EXAMPLE.com./a"))
    fetcher("example.com:443").check(httpx.URL("https://example.com/a"))
    fetcher("[::1]:8080").check(httpx.URL("http://[::1]:8080/"))
    for url in ("https://example.com:8443/", "http://example.com:8080/", "https://sub.example.com/",
                "https://example.com.evil.net/", "http://[::1]/"):
        with pytest.raises(ToolError, match="is not allowed"):
            fetcher("example.com", "example.com:443", "[::1]:8080").check(httpx.URL(url))


@pytest.mark.parametrize(("url", "says"), [
    ("file:///etc/passwd", "only http and https"), ("ftp://127.0.0.1/", "only http and https"),
    ("127.0.0.1/x", "only http and https"), ("http://user:pw@127.0.0.1/", "user name or password"),
    ("http://", "no host"), ("http://[::1", "not a URL"), ("http://x/" + "a" * 3000, "too long"),
])
async def test_http_get_refuses_urls_that_are_not_plain_http(url: str, says: str) -> None:
    with pytest.raises(ToolError, match=says):
        await fetcher("127.0.0.1", "x").run({"url": url})


async def test_http_get_refuses_arguments_without_a_url_string() -> None:
    for arguments in ({}, {"url": 3}, {"href": "http://x/"}, "http://x/"):
        with pytest.raises(ToolError, match="http_get takes"):
            await fetcher("x").run(arguments)  # type: ignore[arg-type]


async def test_http_get_follows_redirects_only_to_allowed_hosts(sites: tuple[Site, Site]) -> None:
    site, other = sites
    assert (await fetcher(site.host).run({"url": site.url("/redirect-in")})).endswith("héllo")
    with pytest.raises(ToolError, match=rf"redirected elsewhere: host {other.host} is not allowed"):
        await fetcher(site.host).run({"url": site.url("/redirect-out")})
    assert other.hits == 0
    with pytest.raises(ToolError, match="redirected elsewhere: only http and https"):
        await fetcher(site.host).run({"url": site.url("/redirect-ftp")})
    with pytest.raises(ToolError, match="more than 5 redirects"):
        await fetcher(site.host).run({"url": site.url("/loop")})
    assert (await fetcher(site.host, other.host).run({"url": site.url("/redirect-out")})).endswith("the other site")


async def test_http_get_cuts_a_big_body_and_says_so(sites: tuple[Site, Site]) -> None:
    site, _ = sites
    text = await fetcher(site.host).run({"url": site.url("/big")})
    head, _, body = text.partition("\n\n")
    assert body == "x" * MAX_BODY_BYTES + f"\n[body cut at {MAX_BODY_BYTES} bytes]"


async def test_http_get_fails_as_the_answer_says_a_4xx_is_a_tool_error_a_5xx_transient(
        sites: tuple[Site, Site]) -> None:
    site, _ = sites
    with pytest.raises(ToolError, match=rf"HTTP 404 Not Found from {site.host}: no such page"):
        await fetcher(site.host).run({"url": site.url("/missing")})
    with pytest.raises(TransientProviderError, match=rf"HTTP 503 Service Unavailable from {site.host}"):
        await fetcher(site.host).run({"url": site.url("/down")})


async def test_http_get_to_a_closed_port_is_transient_and_a_stalled_host_times_out(sites: tuple[Site, Site]) -> None:
    site, _ = sites
    closed = f"127.0.0.1:{free_port()}"
    with pytest.raises(TransientProviderError, match=rf"GET {closed} failed: ConnectError"):
        await fetcher(closed).run({"url": f"http://{closed}/"})
    began = time.monotonic()
    with pytest.raises(ProviderTimeout, match="took longer than 0.5 s"):
        await fetcher(site.host, timeout_s=0.5).run({"url": site.url("/stall")})
    assert time.monotonic() - began < 2


# --- registry, plug-ins, the live policy ---

@asynccontextmanager
async def maintained(settings: Callable[[], WorkerSettings], **options):
    """A Toolbox following `settings` (quickly: a test's changes show within tens of milliseconds)."""
    toolbox = Toolbox(settings, **{"poll_s": 0.02, **options})
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(toolbox.maintain, stop)
        try:
            yield toolbox
        finally:
            stop.set()


async def eventually(condition: Callable[[], object], timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.02)


def test_the_built_in_tools_are_registered_and_offered() -> None:
    toolbox = Toolbox(WorkerSettings)
    assert {"calculator", "http_get"} <= set(toolbox.names())
    assert toolbox.get("calculator").dependency == "tool/calculator"
    assert toolbox.get("calculator").spec.parameters["required"] == ["expression"]
    assert toolbox.get("no_such_tool") is None


def test_a_name_registered_by_two_factories_is_refused_naming_both(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tools, "_factories", dict(tools._factories))

    def first(settings: WorkerSettings):
        raise NotImplementedError

    def second(settings: WorkerSettings):
        raise NotImplementedError

    register("twice", first)
    register("twice", first)  # the same factory again (a module imported twice) is no clash
    with pytest.raises(DuplicateTool, match=r"'twice' is registered twice: by tests\.test_tools\..*first and by "
                                            r"tests\.test_tools\..*second"):
        register("twice", second)
    with pytest.raises(DuplicateTool, match=r"by services\.workers\.tools\.calculator\..* and by tests\..*first"):
        register("calculator", first)
    for name in ("no spaces", "trailing\n", "", "x" * 65):
        with pytest.raises(ValueError, match="a tool's name is"):
            register(name, first)


async def test_a_plug_in_the_policy_names_is_imported_and_its_tool_offered_and_a_missing_one_only_logged(
        caplog: pytest.LogCaptureFixture) -> None:
    settings = WorkerSettings()
    async with maintained(lambda: settings) as toolbox:
        assert toolbox.get("plugin_echo") is None
        settings = WorkerSettings(tool_plugins=["tests.no_such_plugin", "tests.tool_plugin_example"])
        await eventually(lambda: toolbox.get("plugin_echo"))
        assert await toolbox.get("plugin_echo").run({"text": "hi"}) == "hi"
        assert toolbox.get("plugin_echo").dependency == "tool/plugin_echo"
        assert toolbox.stats()["plugins"] == {"tests.no_such_plugin": "ModuleNotFoundError: No module named "
                                                                      "'tests.no_such_plugin'",
                                              "tests.tool_plugin_example": "imported"}
        assert await toolbox.get("calculator").run({"expression": "1 + 1"}) == "2"
    failed = [r for r in caplog.records if r.levelno == logging.ERROR and "tests.no_such_plugin" in r.getMessage()]
    assert len(failed) == 1  # once, though the policy was read many times


async def test_tools_follow_the_live_policy(sites: tuple[Site, Site]) -> None:
    site, _ = sites
    settings = WorkerSettings()
    async with maintained(lambda: settings) as toolbox:
        with pytest.raises(ToolError, match="not allowed"):
            await toolbox.get("http_get").run({"url": site.url("/hello")})
        settings = WorkerSettings(http_allowed_hosts=[site.host])
        await eventually(lambda: toolbox.get("http_get").allowed == {site.host})
        assert (await toolbox.get("http_get").run({"url": site.url("/hello")})).endswith("héllo")


def test_the_policy_refuses_an_mcp_server_whose_name_cannot_be_a_dependency_key() -> None:
    with pytest.raises(msgspec.ValidationError, match="MCP server name 'a/b'"):
        msgspec.convert({"mcp_servers": {"a/b": {"url": "http://127.0.0.1:9/mcp"}}}, WorkerSettings)
