"""A typed view of a JetStream KV bucket with compare-and-set updates.

`update(key, change)` reads the value and its revision, applies `change` (which
mutates the value and returns a result), and writes only if nobody wrote the key
in between; on a conflict it reads again and retries. That is how two replicas
share one budget or one breaker without a lock. `change` may be async: it may read
other keys after this one was read, and the write still happens only if this key
is unchanged since (the budget relies on that order).
`create(key, value)` writes only if the key does not exist: a first-writer-wins marker.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Generic, TypeVar

import anyio
import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from shared.errors import TransientError

T = TypeVar("T")
R = TypeVar("R")
MAX_ATTEMPTS = 64


class Contention(TransientError):
    """A key stayed contended for MAX_ATTEMPTS tries; the caller's message is retried later."""


class TypedBucket(Generic[T]):
    def __init__(self, kv: KeyValue, type_: type[T], default: Callable[[], T]) -> None:
        self.kv = kv
        self.default = default
        self._decoder = msgspec.json.Decoder(type_)
        self._encoder = msgspec.json.Encoder()
        self.conflicts = 0  # CAS retries since start, for stats and benchmarks

    async def get(self, key: str) -> T | None:
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:
            return None
        return self._decoder.decode(entry.value) if entry.value else None

    async def put(self, key: str, value: T) -> None:
        await self.kv.put(key, self._encoder.encode(value))

    async def create(self, key: str, value: T) -> T:
        """Write `value` if `key` does not exist yet; return what the key holds now (the
        first writer's value, whoever that was)."""
        try:
            await self.kv.create(key, self._encoder.encode(value))
            return value
        except KeyWrongLastSequenceError:
            existing = await self.get(key)
            if existing is None:  # deleted in between: rare enough to let the caller retry
                raise Contention(f"key {key!r} was deleted while being created", retry_after_s=0.1) from None
            return existing

    async def update(self, key: str, change: Callable[[T], R] | Callable[[T], Awaitable[R]],
                     default: Callable[[], T] | None = None) -> R:
        """Apply `change` to the current value (or `default()` for a new key) and write it
        atomically (compare-and-set)."""
        for attempt in range(MAX_ATTEMPTS):
            value, revision = await self._read(key, default or self.default)
            before = self._encoder.encode(value)
            result = change(value)
            if inspect.isawaitable(result):
                result = await result
            after = self._encoder.encode(value)
            if after == before:  # nothing to write
                return result
            try:
                await self.kv.update(key, after, last=revision)
                return result
            except KeyWrongLastSequenceError:
                self.conflicts += 1
                await anyio.sleep(random.uniform(0, 0.001 * 2 ** min(attempt, 6)))
        raise Contention(f"key {key!r} stayed contended for {MAX_ATTEMPTS} attempts", retry_after_s=0.5)

    async def scan(self, keys: str) -> AsyncIterator[tuple[str, T]]:
        """The current value of every key matching the pattern `keys` (e.g. "acct.>"), read in one pass."""
        watcher = await self.kv.watch(keys, ignore_deletes=True)
        try:
            async for entry in watcher:
                if entry is None:  # the end of what existed when the pass began
                    return
                if entry.value:
                    yield entry.key, self._decoder.decode(entry.value)
        finally:
            await watcher.stop()

    async def _read(self, key: str, default: Callable[[], T]) -> tuple[T, int]:
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:
            return default(), 0
        return self._decoder.decode(entry.value), entry.revision or 0
