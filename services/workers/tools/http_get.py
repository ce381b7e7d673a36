"""The built-in `http_get` tool: fetch a URL from a host the policy allows.

Only http and https, only to hosts in `workers.http_allowed_hosts` (`name` allows the scheme's
default port only, `name:port` that port; an IPv6 address is written in brackets, `[::1]:8080`).
Redirects are followed by hand, a few at most, and only to allowed hosts; a refused host is never
connected to. No proxy from the environment is used, so the host checked is the host reached.
The body is read up to MAX_BODY_BYTES, then cut.

Errors: a refused URL or a 4xx answer is a ToolError (the model is told; the host answered); a
connection that fails or a 5xx answer is a TransientProviderError; a timeout is a ProviderTimeout.
"""

from __future__ import annotations

from typing import Any

import anyio
import httpx

from contracts.policy import WorkerSettings
from contracts.state import tool_key
from services.workers.conversation import ToolSpec
from services.workers.errors import ProviderTimeout, ToolError, TransientProviderError

NAME = "http_get"
MAX_URL_CHARS = 2_048
MAX_BODY_BYTES = 1 << 20
MAX_REDIRECTS = 5
TIMEOUT_S = 20.0
"""The whole fetch, redirects and body included."""
CONNECT_TIMEOUT_S = 5.0
ERROR_BODY_CHARS = 500
"""Of a 4xx answer's body, quoted in its ToolError."""
REDIRECTS = {301, 302, 303, 307, 308}
DEFAULT_PORTS = {"http": 80, "https": 443}
TEXT_TYPES = ("text/", "application/json", "application/xml", "application/xhtml", "application/javascript",
              "application/rss", "application/atom")
TEXT_SUFFIXES = ("+json", "+xml")


def host_key(url: httpx.URL) -> str:
    """How `http_allowed_hosts` names the host `url` reaches: `name` on the scheme's default port, else `name:port`."""
    host = url.host.lower().rstrip(".")
    host = f"[{host}]" if ":" in host else host
    return host if url.port is None else f"{host}:{url.port}"


class HttpGet:
    spec = ToolSpec(
        name=NAME,
        description="Fetch a URL with HTTP GET and return its status, content type and body text (cut at 1 MiB). "
                    "Only hosts the operator allows can be fetched.",
        parameters={"type": "object", "properties": {"url": {
            "type": "string", "maxLength": MAX_URL_CHARS, "description": "an http:// or https:// URL"}},
            "required": ["url"], "additionalProperties": False},
    )
    dependency = tool_key(NAME)

    def __init__(self, allowed_hosts: list[str], *, timeout_s: float = TIMEOUT_S) -> None:
        self.allowed = {entry.strip().lower().rstrip(".") for entry in allowed_hosts if entry.strip()}
        self.timeout_s = timeout_s

    @classmethod
    def from_settings(cls, settings: WorkerSettings) -> HttpGet:
        return cls(settings.http_allowed_hosts)

    def check(self, url: httpx.URL) -> None:
        """ToolError unless `url` is http(s) to an allowed host."""
        if url.scheme not in ("http", "https"):
            raise ToolError(f"only http and https URLs can be fetched, not {url.scheme or 'a URL without a scheme'}")
        if not url.host:
            raise ToolError("the URL names no host")
        if url.userinfo:
            raise ToolError("URLs with a user name or password are not fetched")
        if host_key(url) not in self.allowed and f"{host_key(url)}:{DEFAULT_PORTS[url.scheme]}" not in self.allowed:
            allowed = ", ".join(sorted(self.allowed)) or "none (the policy's workers.http_allowed_hosts is empty)"
            raise ToolError(f"host {host_key(url)} is not allowed; allowed hosts: {allowed}")

    async def run(self, arguments: dict[str, Any]) -> str:
        raw = arguments.get("url") if isinstance(arguments, dict) else None
        if not isinstance(raw, str):
            raise ToolError('http_get takes {"url": "http://..."}')
        if len(raw) > MAX_URL_CHARS:
            raise ToolError(f"the URL is too long ({len(raw)} characters; at most {MAX_URL_CHARS})")
        try:
            url = httpx.URL(raw.strip())
        except httpx.InvalidURL as exc:
            raise ToolError(f"not a URL: {exc}") from None
        self.check(url)
        timeout = httpx.Timeout(self.timeout_s, connect=CONNECT_TIMEOUT_S)
        try:
            with anyio.fail_after(self.timeout_s):
                async with httpx.AsyncClient(timeout=timeout, follow_redirects=False, trust_env=False) as client:
                    return await self._fetch(client, url)
        except (TimeoutError, httpx.TimeoutException):
            raise ProviderTimeout(f"GET {host_key(url)} took longer than {self.timeout_s:g} s") from None
        except httpx.RequestError as exc:  # refused, reset, a broken answer
            raise TransientProviderError(f"GET {host_key(url)} failed: {type(exc).__name__}: {exc}") from None

    async def _fetch(self, client: httpx.AsyncClient, url: httpx.URL) -> str:
        for _ in range(MAX_REDIRECTS + 1):
            async with client.stream("GET", url) as response:
                location = response.headers.get("location")
                if response.status_code in REDIRECTS and location:
                    try:
                        target = url.join(location)
                    except httpx.InvalidURL:
                        raise ToolError(f"{host_key(url)} redirected to an invalid URL") from None
                    try:
                        self.check(target)
                    except ToolError as refused:
                        raise ToolError(f"{host_key(url)} redirected elsewhere: {refused}") from None
                    url = target
                    continue
                body, cut = await _read_capped(response)
                return _answer(response, body, cut)
        raise ToolError(f"more than {MAX_REDIRECTS} redirects")


async def _read_capped(response: httpx.Response) -> tuple[bytes, bool]:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return b"".join(chunks)[:MAX_BODY_BYTES], True
    return b"".join(chunks), False


def _answer(response: httpx.Response, body: bytes, cut: bool) -> str:
    status = response.status_code
    content_type = response.headers.get("content-type", "")
    if _is_text(content_type):
        text = _decode(body, response.charset_encoding)
    else:
        text = f"[{len(body)}{'+' if cut else ''} bytes of {content_type or 'unknown type'}, not shown]"
    if 400 <= status < 500:
        raise ToolError(f"HTTP {status} {response.reason_phrase} from {host_key(response.url)}: "
                        f"{text[:ERROR_BODY_CHARS]}")
    if status >= 500:
        raise TransientProviderError(f"HTTP {status} {response.reason_phrase} from {host_key(response.url)}")
    note = f"\n[body cut at {MAX_BODY_BYTES} bytes]" if cut and _is_text(content_type) else ""
    return f"HTTP {status} {response.reason_phrase}\ncontent-type: {content_type or 'unknown'}\n\n{text}{note}"


def _is_text(content_type: str) -> bool:
    kind = content_type.split(";", 1)[0].strip().lower()
    return not kind or kind.startswith(TEXT_TYPES) or kind.endswith(TEXT_SUFFIXES)


def _decode(body: bytes, charset: str | None) -> str:
    try:
        return body.decode(charset or "utf-8", errors="replace")
    except LookupError:  # a charset Python does not know
        return body.decode("utf-8", errors="replace")
