"""What the HTTP model providers share: one httpx client each, the key read from its environment variable at
every call, the exchange (a POST whose answer streams as server-sent events), and the mapping of every way
it can fail onto the worker's error classes (services.workers.errors).

Keys never leave this module in words: no message, log line or repr holds one. Errors are raised `from None`,
since an httpx exception holds the request and so its headers; every message a server sent back is
scrubbed of the key before it is used, and clipped.
"""

from __future__ import annotations

import logging
import math
import os
from contextlib import asynccontextmanager
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, NamedTuple

import httpx
import msgspec

from contracts.events import clip
from contracts.policy import ProviderConfig
from services.workers.errors import (
    PermanentProviderError,
    ProviderError,
    ProviderRateLimited,
    ProviderTimeout,
    TransientProviderError,
)

LOCAL_MODEL_ENV = "CORRAL_LOCAL_MODEL_URL"
MAX_ERROR_BODY = 64 * 1024
"""Bytes of an error answer read for its message; the rest is not read."""
MAX_WHOLE_BODY = 8 * 1024 * 1024
"""Bytes of an answer that came whole (a server that does not stream) before it counts as malformed."""
MAX_EVENT_BYTES = 1024 * 1024
"""Bytes of one server-sent event before the stream counts as malformed (so a server cannot fill memory)."""
MAX_RETRY_AFTER_S = 366 * 86_400.0
MAX_TOKENS_A_CALL = 10_000_000
REDACTED = "[redacted]"
BODY_SNIPPET_CHARS = 300

_httpx_log = logging.getLogger("httpx")
if _httpx_log.level == logging.NOTSET:
    # httpx logs every request at INFO. Its lines carry no headers, but a worker makes many calls and logs
    # its own; an operator who wants them sets the httpx logger's level, which this leaves alone.
    _httpx_log.setLevel(logging.WARNING)


class SseEvent(NamedTuple):
    """One server-sent event: its `event:` name (empty when it had none) and its `data:` lines, joined."""

    name: str
    data: bytes


OnEvent = Callable[[SseEvent], bool]
"""Takes one event; returns True when it was the last one (OpenAI's `[DONE]`, Anthropic's `message_stop`)."""
OnWhole = Callable[[bytes], None]
"""Takes an answer that came whole, as JSON, from a server that did not stream."""


class ErrorDetail(msgspec.Struct):
    """The `error` object of an error answer or event."""

    message: str | None = None
    type: str | None = None
    code: str | int | None = None


class _ErrorBody(msgspec.Struct):
    """An error answer: OpenAI's `{"error": {...}}`, Anthropic's `{"type": "error", "error": {...}}`, a bare
    `{"error": "..."}`, or FastAPI's `{"detail": "..."}`."""

    error: ErrorDetail | str | None = None
    message: str | None = None
    detail: str | None = None


_error_body = msgspec.json.Decoder(_ErrorBody)


class ErrorReport(NamedTuple):
    """What an error answer or event says: its message and its type or code words (e.g. `rate_limit_error`)."""

    message: str
    kind: str


def error_report(body: bytes) -> ErrorReport | None:
    """The message and kind of an error body or event, or None when it is not JSON of a known shape."""
    try:
        decoded = _error_body.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return report_of(decoded.error, decoded.message or decoded.detail)


def report_of(error: ErrorDetail | str | None, fallback: str | None = None) -> ErrorReport | None:
    if isinstance(error, ErrorDetail):
        kind = " ".join(str(word) for word in (error.type, error.code) if word not in (None, ""))
        return ErrorReport(error.message or fallback or kind or "no message", kind)
    if isinstance(error, str):
        return ErrorReport(error, "")
    return ErrorReport(fallback, "") if fallback else None


def class_for_status(status: int, kind: str = "") -> type[ProviderError]:
    """The error class of an HTTP status: 429 is rate limiting (unless the account is out of quota); 408, 409
    and every 5xx (Anthropic's 529 too) may pass; any other status the call will get again."""
    if status == 429:
        return PermanentProviderError if "insufficient_quota" in kind else ProviderRateLimited
    if status in (408, 409) or status >= 500:
        return TransientProviderError
    return PermanentProviderError


def class_for_kind(kind: str) -> type[ProviderError]:
    """The error class of an error's type or code words, for errors that arrive inside a stream, after the
    status said 200: a status among the words decides; then overloaded, server, rate-limit and timeout
    words; the words of a request or an account that is wrong are permanent; anything else may pass."""
    words = kind.lower()
    for word in words.split():
        if word.isdigit() and 400 <= int(word) <= 599:
            return class_for_status(int(word), words)
    if "insufficient_quota" in words:
        return PermanentProviderError
    if "rate_limit" in words or "throttl" in words or "too_many" in words:
        return ProviderRateLimited
    if "timeout" in words:
        return ProviderTimeout
    if any(word in words for word in ("overloaded", "server", "api_error", "internal", "unavailable")):
        return TransientProviderError
    if any(word in words for word in ("invalid", "authentication", "permission", "not_found", "too_large",
                                      "context_length", "billing")):
        return PermanentProviderError
    return TransientProviderError


def retry_after_s(headers: httpx.Headers) -> float | None:
    """The wait a server asked for: `retry-after-ms` (OpenAI's, more precise) or `Retry-After` in seconds or as
    an HTTP date; None when it gave none or nonsense."""
    if (ms := _seconds(headers.get("retry-after-ms"))) is not None:
        return min(ms / 1000, MAX_RETRY_AFTER_S)
    value = headers.get("retry-after")
    if value is None:
        return None
    if (seconds := _seconds(value)) is not None:
        return min(seconds, MAX_RETRY_AFTER_S)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return min(max(0.0, (when - datetime.now(UTC)).total_seconds()), MAX_RETRY_AFTER_S)


def _seconds(value: str | None) -> float | None:
    try:
        seconds = float(value) if value is not None else math.nan
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def tokens(value: int | None) -> int:
    """A token count a server reported, within the contract's bounds."""
    return min(max(0, value or 0), MAX_TOKENS_A_CALL)


def snippet(body: bytes) -> str:
    """The start of a body that is not JSON, on one line, for a message."""
    text = " ".join(body[:BODY_SNIPPET_CHARS * 4].decode(errors="replace").split())
    return clip(text, BODY_SNIPPET_CHARS) if text else "an empty body"


class Api:
    """One provider's HTTP side: where it is, how it signs in, and its connection pool."""

    def __init__(self, name: str, config: ProviderConfig, base_url: str,
                 auth_headers: Callable[[str], dict[str, str]], headers: dict[str, str] | None = None) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.key_env = config.api_key_env
        self.read_timeout_s = config.read_timeout_s
        self.connect_timeout_s = config.connect_timeout_s
        self._auth_headers = auth_headers
        self.client = httpx.AsyncClient(
            headers=headers or {}, follow_redirects=False,
            timeout=httpx.Timeout(connect=config.connect_timeout_s, read=config.read_timeout_s,
                                  write=config.read_timeout_s, pool=config.connect_timeout_s))

    def __repr__(self) -> str:
        return f"<Api {self.name} at {self.base_url or '(no base_url)'}, key from ${self.key_env or '(none)'}>"

    async def aclose(self) -> None:
        await self.client.aclose()

    def key(self) -> str:
        """The key, read now (so a rotated key is used without a restart), without surrounding whitespace;
        empty when none is configured."""
        if not self.key_env:
            return ""
        key = os.environ.get(self.key_env, "").strip()
        if not key:
            raise PermanentProviderError(f"{self.name}: the environment variable {self.key_env} that should hold "
                                         "its API key is not set")
        if not (key.isascii() and key.isprintable()):
            # an HTTP library's complaint about such a header would quote it, escaped past any scrubbing
            raise PermanentProviderError(f"{self.name}: the API key in {self.key_env} has characters no HTTP "
                                         "header may carry")
        return key

    def url(self, path: str) -> str:
        if not self.base_url:
            raise PermanentProviderError(f"{self.name}: no base_url, and no local model server: set the provider's "
                                         f"base_url in the policy, or {LOCAL_MODEL_ENV} for the workers")
        return f"{self.base_url}/{path}"

    async def exchange(self, path: str, body: dict[str, Any], on_event: OnEvent, on_whole: OnWhole) -> None:
        """POST `body` to `path` and hand each event of the streamed answer to `on_event` until it says it was
        the last; an answer that came whole goes to `on_whole`. Every failure raises a ProviderError: those
        the handlers raise come out scrubbed of the key, clipped and prefixed with the provider's name."""
        url = self.url(path)
        key = self.key()
        async with self._mapped(key):
            await self._exchange(url, body, self._auth_headers(key) if key else {}, on_event, on_whole)

    async def fetch(self, method: str, path: str, body: dict[str, Any] | None = None, *,
                    limit: int = MAX_WHOLE_BODY) -> bytes:
        """One request that is not streamed (`path` under base_url, or a whole URL there): its body, up to `limit`
        bytes. A status other than 200 and every failure raise a ProviderError, as `exchange` does."""
        url = path if path.startswith(f"{self.base_url}/") else self.url(path)
        key = self.key()
        async with self._mapped(key):
            headers = self._auth_headers(key) if key else {}
            async with self.client.stream(method, url, json=body, headers=headers) as response:
                if response.status_code != 200:
                    raise self.status_error(response, await _read(response, MAX_ERROR_BODY))
                whole = await _read(response, limit + 1)
            if len(whole) > limit:
                raise TransientProviderError(f"an answer larger than {limit} bytes")
            return whole

    @asynccontextmanager
    async def _mapped(self, key: str) -> AsyncIterator[None]:
        """Every failure inside as a ProviderError of its class, scrubbed of the key and clipped."""
        try:
            yield
        except ProviderError as error:
            raise type(error)(self.words(str(error), key), retry_after_s=error.retry_after_s) from None
        except httpx.TimeoutException as error:
            raise ProviderTimeout(self.words(self._timeout_words(error), key)) from None
        except (httpx.UnsupportedProtocol, httpx.InvalidURL, httpx.LocalProtocolError) as error:
            raise PermanentProviderError(self.words(f"cannot call {self.base_url}: {error}", key)) from None
        except httpx.ConnectError as error:
            raise TransientProviderError(self.words(f"cannot connect to {self.base_url}: {error}", key)) from None
        except httpx.RemoteProtocolError as error:
            raise TransientProviderError(self.words(f"the connection broke off: {error}", key)) from None
        except httpx.HTTPError as error:  # read and write errors, a body that does not decode, ...
            raise TransientProviderError(self.words(f"{type(error).__name__}: {error}", key)) from None

    async def _exchange(self, url: str, body: dict[str, Any], headers: dict[str, str], on_event: OnEvent,
                        on_whole: OnWhole) -> None:
        async with self.client.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code != 200:
                raise self.status_error(response, await _read(response, MAX_ERROR_BODY))
            if response.headers.get("content-type", "").startswith("application/json"):
                whole = await _read(response, MAX_WHOLE_BODY + 1)
                if len(whole) > MAX_WHOLE_BODY:
                    raise TransientProviderError(f"an answer larger than {MAX_WHOLE_BODY} bytes")
                return on_whole(whole)
            async for event in sse_events(response.aiter_bytes()):
                if on_event(event):
                    return
        raise TransientProviderError("the stream ended before its last event")

    def status_error(self, response: httpx.Response, body: bytes) -> ProviderError:
        report = error_report(body)
        status = f"HTTP {response.status_code}"
        if report is None:
            return class_for_status(response.status_code)(
                f"{status}, with a body that is not a JSON error: {snippet(body)}",
                retry_after_s=retry_after_s(response.headers))
        return class_for_status(response.status_code, report.kind)(
            f"{status}: {report.message}", retry_after_s=retry_after_s(response.headers))

    def words(self, message: str, key: str) -> str:
        """`message` for an error: the provider's name first, the key nowhere, clipped to the contract's size."""
        if key:
            message = message.replace(key, REDACTED)
        return clip(f"{self.name}: {message}" if not message.startswith(f"{self.name}: ") else message)

    def _timeout_words(self, error: httpx.TimeoutException) -> str:
        if isinstance(error, httpx.ConnectTimeout):
            return f"could not connect to {self.base_url} within {self.connect_timeout_s} s"
        if isinstance(error, httpx.PoolTimeout):
            return f"no connection to {self.base_url} was free within {self.connect_timeout_s} s"
        return f"{self.base_url} was silent for {self.read_timeout_s} s ({type(error).__name__})"


async def _read(response: httpx.Response, limit: int) -> bytes:
    """Up to `limit` bytes of the body; the rest is left unread."""
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) >= limit:
            break
    return bytes(body[:limit])


async def sse_events(chunks: AsyncIterator[bytes]) -> AsyncIterator[SseEvent]:
    """The events of a `text/event-stream` body (WHATWG's format: `event:` and `data:` fields, a blank line
    ends each event, `:` starts a comment); an event left unfinished at the end is dropped, as the format
    says. An event larger than MAX_EVENT_BYTES is an error."""
    buffer = bytearray()
    name, data = "", []
    size = 0
    async for chunk in chunks:
        buffer += chunk
        while (end := buffer.find(b"\n")) >= 0:
            line = bytes(buffer[:end]).removesuffix(b"\r")
            del buffer[:end + 1]
            if not line:
                if data:
                    yield SseEvent(name, b"\n".join(data))
                name, data, size = "", [], 0
                continue
            field, _, value = line.partition(b":")
            value = value.removeprefix(b" ")
            if field == b"data":
                data.append(value)
                size += len(value)
            elif field == b"event":
                name = value.decode(errors="replace")
            if size > MAX_EVENT_BYTES:
                raise TransientProviderError(f"an event larger than {MAX_EVENT_BYTES} bytes")
        if len(buffer) > MAX_EVENT_BYTES:
            raise TransientProviderError(f"an event larger than {MAX_EVENT_BYTES} bytes")
