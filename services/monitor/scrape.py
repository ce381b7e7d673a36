"""The monitor's Prometheus scrape endpoint: `GET /metrics` over plain HTTP/1.1, one answer per connection.

Deliberately small: a request line and headers of at most MAX_REQUEST_BYTES, read within READ_TIMEOUT_S,
then the exposition (or 404 / 405 / 400) and the connection closes. Anything else a client sends is refused
with its reason; nothing it sends reaches the figures.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import anyio
from anyio.abc import SocketStream

log = logging.getLogger(__name__)
MAX_REQUEST_BYTES = 8192
READ_TIMEOUT_S = 5.0


def _answer(status: str, body: bytes, content_type: str = "text/plain; charset=utf-8") -> bytes:
    head = (f"HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n\r\n")
    return head.encode() + body


async def _read_head(stream: SocketStream) -> bytes | None:
    data = b""
    with anyio.move_on_after(READ_TIMEOUT_S):
        while b"\r\n\r\n" not in data:
            if len(data) > MAX_REQUEST_BYTES:
                return None
            try:
                data += await stream.receive(4096)
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                return None
        return data
    return None


def respond(head: bytes | None, render: Callable[[], bytes], content_type: str) -> bytes:
    if head is None:
        return _answer("400 Bad Request", b"request too large, too slow or cut off\n")
    parts = head.split(b"\r\n", 1)[0].split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        return _answer("400 Bad Request", b"not an HTTP/1.x request line\n")
    method, target = parts[0], parts[1].split(b"?", 1)[0]
    if target != b"/metrics":
        return _answer("404 Not Found", b"only /metrics is here\n")
    if method not in (b"GET", b"HEAD"):
        return _answer("405 Method Not Allowed", b"GET /metrics\n")
    answer = _answer("200 OK", render(), content_type)
    return answer.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n" if method == b"HEAD" else answer


async def serve(host: str, port: int, render: Callable[[], bytes], content_type: str, stop: anyio.Event,
                bound: Callable[[int], None] = lambda port: None) -> None:
    """Serve until `stop`; `bound(port)` is told the port (port 0: any free one)."""
    listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    bound(port)
    log.info("metrics for Prometheus on http://%s:%d/metrics", host, port)

    async def handle(stream: SocketStream) -> None:
        async with stream:
            try:
                await stream.send(respond(await _read_head(stream), render, content_type))
            except (anyio.BrokenResourceError, OSError):
                pass

    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        await stop.wait()
        tg.cancel_scope.cancel()
