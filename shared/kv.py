"""A typed view of a JetStream KV bucket with compare-and-set updates.

`update(key, change)` reads the value and its revision, applies `change` (which
mutates the value and returns a result), and writes only if nobody wrote the key
in between; on a conflict it reads again and retries. That is how two replicas
share one budget or one breaker without a lock.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Generic, TypeVar

import anyio
import msgspec
from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

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

    async def read(self, key: str) -> tuple[T | None, int]:
        """The value and its revision (None and 0 for a key never written), for `write_if`."""
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:
            return None, 0
        return (self._decoder.decode(entry.value) if entry.value else None), entry.revision or 0

    async def write_if(self, key: str, value: T, revision: int) -> bool:
        """Write only if the key is still at `revision` (0: only if it does not exist); False if someone
        wrote it in between. For a change that needs I/O between the read and the write."""
        try:
            await self.kv.update(key, self._encoder.encode(value), last=revision)
        except KeyWrongLastSequenceError:
            self.conflicts += 1
            return False
        return True

    async def update(self, key: str, change: Callable[[T], R], default: Callable[[], T] | None = None) -> R:
        """Apply `change` to the current value (or `default()` for a new key) and write it
        atomically (compare-and-set)."""
        for attempt in range(MAX_ATTEMPTS):
            value, revision = await self._read(key, default or self.default)
            before = self._encoder.encode(value)
            result = change(value)
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

    async def _read(self, key: str, default: Callable[[], T]) -> tuple[T, int]:
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:
            return default(), 0
        return self._decoder.decode(entry.value), entry.revision or 0


async def follow_bucket(kv: KeyValue, apply: Callable[[str, bytes | None], None], stop: anyio.Event) -> None:
    """Call `apply(key, value)` for every key's current value, then for every change (None: deleted),
    until `stop` is set. How a service keeps a read-only view of another's bucket."""
    watcher = await kv.watchall()
    try:
        while not stop.is_set():
            try:
                entry = await watcher.updates(timeout=1.0)
            except NatsTimeout:
                continue
            if entry is None:  # end of the initial values
                continue
            apply(entry.key, None if entry.operation in (KV_DEL, KV_PURGE) else entry.value)
    finally:
        await watcher.stop()
