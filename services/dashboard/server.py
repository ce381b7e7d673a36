"""`corral dashboard`: a small HTTP server (asyncio streams, no framework) for the web dashboard.

    GET /                 the page (static/index.html)
    GET /static/NAME      the page's script, styles and the vendored uPlot
    GET /api/now          the newest sample (services.dashboard.samples.Sample)
    GET /api/history      every sample of the last hour, oldest first
    GET /api/task?id=T&tenant=N   the executor's record of task T (as `corral status T`)

It polls the monitor once a second over the bus and keeps the last hour of samples, so a page opened
late still draws the hour. Requests are untrusted: a request line or headers past a few KiB, a method
other than GET, or a query that does not validate is answered 4xx with the reason, never a crash.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import anyio
import msgspec
from nats.errors import Error as NatsError

from contracts.queries import TaskStatusQuery
from services.client import Client
from services.dashboard.errors import BadRequest, DashboardError, MethodNotAllowed, MonitorSilent, NotFound
from services.dashboard.samples import History, observe

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8"}
HEAD_LIMIT = 8192
"""Bytes of request line plus headers a request may have."""
READ_TIMEOUT_S = 10.0
LINGER_S = 1.0
"""How long a closing connection waits for the peer to finish sending (see _linger)."""
LINGER_BYTES = 1024 * 1024
SAMPLE_EVERY_S = 1.0
_encode = msgspec.json.Encoder().encode


class Dashboard:
    def __init__(self, client: Client, clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.clock = clock
        self.history = History()
        self.sampled = anyio.Event()
        """Set once the first sample is in."""

    async def sample_forever(self, stop: anyio.Event) -> None:
        while not stop.is_set():
            try:
                await observe(self.client, self.history, self.clock(), timeout=SAMPLE_EVERY_S * 3)
                self.sampled.set()
            except (TimeoutError, NatsError, msgspec.DecodeError, msgspec.ValidationError) as error:  # keep the hour
                log.warning("the monitor did not answer: %r", error)
            with anyio.move_on_after(SAMPLE_EVERY_S):
                await stop.wait()

    async def route(self, method: str, target: str) -> tuple[str, bytes]:
        """(content type, body) for one request; a DashboardError says why not."""
        if method != "GET":
            raise MethodNotAllowed(f"{method} is not served here: only GET")
        parts = urlsplit(target)
        path = unquote(parts.path)
        if path == "/":
            return self._static("index.html")
        if path.startswith("/static/"):
            return self._static(path.removeprefix("/static/"))
        if path == "/api/now":
            if not self.history.samples:
                raise MonitorSilent("no sample yet: the monitor has not answered")
            return "application/json", _encode(self.history.samples[-1])
        if path == "/api/history":
            return "application/json", _encode(list(self.history.samples))
        if path == "/api/task":
            return "application/json", await self._task(parse_qs(parts.query))
        raise NotFound(f"nothing at {path[:200]}")

    def _static(self, name: str) -> tuple[str, bytes]:
        file = STATIC / name
        if "/" in name or name.startswith(".") or file.suffix not in TYPES or not file.is_file():
            raise NotFound(f"no static file {name[:200]!r}")
        return TYPES[file.suffix], file.read_bytes()

    async def _task(self, query: dict[str, list[str]]) -> bytes:
        try:
            ask = msgspec.convert({"task_id": query.get("id", [""])[0],
                                   "tenant": query.get("tenant", ["default"])[0]}, TaskStatusQuery)
        except msgspec.ValidationError as error:
            raise BadRequest(f"not a task query: {error}") from None
        try:
            return _encode(await self.client.task_status(ask.task_id, tenant=ask.tenant))
        except (TimeoutError, NatsError):
            raise MonitorSilent("the executor did not answer the task query") from None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            status, kind, body = 200, "", b""
            try:
                method, target = await _request_line(reader)
                kind, body = await self.route(method, target)
            except DashboardError as error:
                status, kind, body = error.status, "application/json", _encode({"error": str(error)})
            except Exception:  # a defect here: answer it, log it, keep serving
                log.exception("failed to answer a request")
                status, kind, body = 500, "application/json", _encode({"error": "internal error (logged)"})
            writer.write(_response(status, kind, body))
            await writer.drain()
            await _linger(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the peer went away: nothing to answer
        finally:
            writer.close()


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Close the sending side, then read what the peer still sends (a refused request's rest), up to a bound,
    before closing: closing with unread bytes makes the kernel reset the connection, and the peer can lose the
    answer it was sent."""
    if writer.can_write_eof():
        writer.write_eof()
    read = 0
    try:
        while read < LINGER_BYTES and (chunk := await asyncio.wait_for(reader.read(64 * 1024), LINGER_S)):
            read += len(chunk)
    except (asyncio.TimeoutError, asyncio.LimitOverrunError, ValueError):
        pass


async def _request_line(reader: asyncio.StreamReader) -> tuple[str, str]:
    """The method and target of the request on READER; its headers are read and ignored."""
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
    except asyncio.LimitOverrunError:
        raise BadRequest(f"request head over {HEAD_LIMIT} bytes") from None
    except asyncio.TimeoutError:
        raise BadRequest("request head not sent in time") from None
    words = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
    if len(words) != 3 or not words[2].startswith("HTTP/") or not words[1].startswith("/"):
        raise BadRequest("not an HTTP request line")
    return words[0], words[1]


REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 500: "Internal Server Error",
           504: "Gateway Timeout"}


def _response(status: int, kind: str, body: bytes) -> bytes:
    head = (f"HTTP/1.1 {status} {REASONS[status]}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
            "Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\nConnection: close\r\n\r\n")
    return head.encode() + body


async def serve(client: Client, host: str, port: int, stop: anyio.Event,
                on_listening: Callable[[str], None]) -> None:
    """Serve the dashboard on HOST:PORT (0: any free port) until STOP; ON_LISTENING gets its URL."""
    dashboard = Dashboard(client)
    server = await asyncio.start_server(dashboard.handle, host, port, limit=HEAD_LIMIT)
    bound = server.sockets[0].getsockname()
    async def announce() -> None:  # once there is something to show
        await dashboard.sampled.wait()
        on_listening(f"http://{bound[0]}:{bound[1]}/")

    async with server, anyio.create_task_group() as tg:
        tg.start_soon(dashboard.sample_forever, stop)
        tg.start_soon(announce)
        await stop.wait()
        tg.cancel_scope.cancel()
