"""Headless Chromium (Debian's `chromium`) driven over the DevTools protocol, for tests of pages Corral serves.

The DevTools websocket is spoken here with the standard library (RFC 6455 client frames: masked text out,
unmasked text in), so the tests need no websocket package. `Page` collects console errors and uncaught
exceptions from before the first navigation on.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import struct
import subprocess
import tempfile
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

import anyio


FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1280,1000")


def chromium_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class _Socket:
    """One websocket connection: text messages in and out."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, url: str) -> _Socket:
        parts = urlsplit(url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port, limit=64 * 1024 * 1024)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write((f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        return cls(reader, writer)

    async def send(self, text: str) -> None:
        data, mask = text.encode(), os.urandom(4)
        size = len(data)
        head = bytes([0x81]) + (bytes([0x80 | size]) if size < 126 else
                                struct.pack("!BH", 0x80 | 126, size) if size < 65536 else
                                struct.pack("!BQ", 0x80 | 127, size))
        self.writer.write(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))
        await self.writer.drain()

    async def receive(self) -> str:
        message = b""
        while True:
            first, second = await self.reader.readexactly(2)
            size = second & 0x7F
            if size == 126:
                size = struct.unpack("!H", await self.reader.readexactly(2))[0]
            elif size == 127:
                size = struct.unpack("!Q", await self.reader.readexactly(8))[0]
            payload = await self.reader.readexactly(size)
            if first & 0x0F in (0x1, 0x0):  # text, or its continuation
                message += payload
                if first & 0x80:
                    return message.decode()

    def close(self) -> None:
        self.writer.close()


class Page:
    """One tab: commands by DevTools method name; console errors and exceptions gathered as they come."""

    def __init__(self, socket: _Socket) -> None:
        self.socket = socket
        self.next_id = 0
        self.replies: dict[int, asyncio.Future] = {}
        self.errors: list[str] = []
        self.loaded = anyio.Event()

    async def listen(self) -> None:
        while True:
            message = json.loads(await self.socket.receive())
            if "id" in message and message["id"] in self.replies:
                self.replies.pop(message["id"]).set_result(message)
            else:
                self._event(message.get("method", ""), message.get("params", {}))

    def _event(self, method: str, params: dict) -> None:
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            self.errors.append(" ".join(str(arg.get("value", arg.get("description"))) for arg in params["args"]))
        elif method == "Runtime.exceptionThrown":
            self.errors.append(params["exceptionDetails"].get("exception", {}).get("description", "exception"))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            self.errors.append(f"{params['entry']['text']} ({params['entry'].get('url', '')})")
        elif method == "Page.loadEventFired":
            self.loaded.set()

    async def call(self, method: str, **params) -> dict:
        self.next_id += 1
        reply = self.replies[self.next_id] = asyncio.get_running_loop().create_future()
        await self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        with anyio.fail_after(60):
            message = await reply
        assert "error" not in message, message
        return message["result"]

    async def evaluate(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    async def screenshot(self, path: Path) -> Path:
        path.write_bytes(base64.b64decode((await self.call("Page.captureScreenshot", format="png"))["data"]))
        return path


def _page_socket_url(profile: Path) -> str | None:
    """The blank tab's DevTools socket, once Chromium has written the port it took (its first line of
    DevToolsActivePort in the profile: port 0 lets it bind one no other process can take first)."""
    try:
        port = int((profile / "DevToolsActivePort").read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as reply:
            pages = [target for target in json.load(reply) if target["type"] == "page"]
    except (OSError, ValueError, IndexError):
        return None
    return pages[0]["webSocketDebuggerUrl"] if pages else None


@asynccontextmanager
async def browser(log_dir: Path) -> AsyncIterator[Page]:
    """A fresh headless Chromium with one blank tab, its console watched; closed on leaving."""
    profile = Path(tempfile.mkdtemp(prefix="chromium-profile-", dir=log_dir))
    with (log_dir / "chromium.log").open("ab") as log:
        proc = subprocess.Popen([chromium_binary(), *FLAGS, f"--user-data-dir={profile}",
                                 "--remote-debugging-port=0", "about:blank"],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with anyio.fail_after(90):  # a loaded machine starts chromium slowly
            while not (url := await anyio.to_thread.run_sync(_page_socket_url, profile)):
                assert proc.poll() is None, f"chromium exited; see {log_dir / 'chromium.log'}"
                await anyio.sleep(0.1)
        socket = await _Socket.connect(url)
        page = Page(socket)
        async with anyio.create_task_group() as tg:
            tg.start_soon(page.listen)
            for domain in ("Runtime", "Log", "Page"):
                await page.call(f"{domain}.enable")
            yield page
            tg.cancel_scope.cancel()
        socket.close()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(profile, ignore_errors=True)
