"""A typed view of a JetStream KV bucket with compare-and-set updates.

`update(key, change)` reads the value and its revision, applies `change` (which
mutates the value and returns a result), and writes only if nobody wrote the key
in between; on a conflict it reads again and retries. That is how two replicas
share one budget or one breaker without a lock. `change` may be async: it may read
other keys after this one was read, and the write still happens only if this key
is unchanged since (the budget relies on that order). Within one process, updates
of the same key that arrive together are applied in order and written at once.
`create(key, value)` writes only if the key does not exist: a first-writer-wins marker.

`expires(value)` (optional) gives each write a time to live: the key is removed
that many seconds after its last write (nats-server's per-message TTL; None keeps
it). Records of finished work use it, so buckets do not grow forever.

`reuse_written=True` (optional) lets the next update of a key start from the value
object this process last wrote, instead of decoding its bytes again; worth it for
large values (a tenant's budget account). Only for changes whose results never hold
mutable parts of the value: a later change would alter them under the caller.

A value that does not decode is quarantined, then moved aside: its bytes go to the
dead-letter stream (shared/quarantine.py), and the bucket treats the key as absent
*at that value's revision*. `get` gives None; `read` gives (None, revision), which no
key that is merely absent gives (its revision is 0); `update` starts from the default;
`create` writes. So the next write replaces the bad value, by compare-and-set on its
revision: a good value written since is kept, and of several replicas one replaces it.
Why this and not leaving the value in place: a key that can never be written again
stops its user, dependency or task for good, while the letter keeps every byte for an
operator to read. The bucket's owner decides what a fresh start means for its records
(the executor fails a task whose record is lost instead of running it again).
"""

from __future__ import annotations

import asyncio
import inspect
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Generic, TypeVar

import anyio
import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from shared.errors import TransientError
from shared.quarantine import Quarantine

T = TypeVar("T")
R = TypeVar("R")
MAX_ATTEMPTS = 64
LAST_WRITTEN_KEYS = 4096  # keys whose last write this process remembers


class Contention(TransientError):
    """A key stayed contended for MAX_ATTEMPTS tries; the caller's message is retried later."""


class _Waiter:
    """One caller's change, queued for the next write of its key."""

    def __init__(self, change: Callable[[Any], Any], default: Callable[[], Any] | None) -> None:
        self.change = change
        self.default = default
        # set when done, or when it is this caller's turn to lead. An asyncio Event, not anyio's: making
        # one of those asks for the current task, a getpid system call on Python 3.11, on every update.
        self.wake = asyncio.Event()
        self.finished = False
        self.result: Any = None
        self.error: BaseException | None = None

    def finish(self, *, result: Any = None, error: BaseException | None = None) -> None:
        self.result, self.error, self.finished = result, error, True
        self.wake.set()


class TypedBucket(Generic[T]):
    def __init__(self, kv: KeyValue, type_: type[T], default: Callable[[], T],
                 expires: Callable[[T], float | None] | None = None, *, reuse_written: bool = False,
                 quarantine: Quarantine | None = None) -> None:
        self.kv = kv
        self.name = bucket_name(kv)
        self.quarantine = quarantine or Quarantine()
        self.default = default
        self.expires = expires
        self.reuse_written = reuse_written
        self._decoder = msgspec.json.Decoder(type_ | None)  # null: no record (what replaces a quarantined one)
        self._encoder = msgspec.json.Encoder()
        self.conflicts = 0  # CAS retries since start, for stats and benchmarks
        self._queued: dict[str, list[_Waiter]] = {}
        # key -> (encoded value, revision, the value itself if it may be reused), oldest first
        self._last_written: dict[str, tuple[bytes, int, T | None]] = {}
        self._leaders: set[str] = set()

    async def get(self, key: str) -> T | None:
        value, _ = await self.read(key)
        return value

    async def put(self, key: str, value: T) -> None:
        await self.kv.put(key, self._encoder.encode(value))

    async def create(self, key: str, value: T) -> T:
        """Write `value` if `key` does not exist yet; return what the key holds now (the
        first writer's value, whoever that was)."""
        encoded = self._encoder.encode(value)
        try:
            revision = await self.kv.create(key, encoded, msg_ttl=self._ttl(value))
            self._remember(key, encoded, revision)
            return value
        except KeyWrongLastSequenceError:
            existing, revision = await self.read(key)
            if existing is None and revision and await self.write_if(key, value, revision):
                return value  # the key held a value that does not decode: quarantined, and replaced
            if existing is None:  # deleted in between: rare enough to let the caller retry
                raise Contention(f"key {key!r} was deleted while being created", retry_after_s=0.1) from None
            return existing

    async def read(self, key: str, *, cached: bool = False) -> tuple[T | None, int]:
        """The value and its revision (None and 0 for a key never written; None and its revision for
        a value that does not decode, quarantined), for `write_if`.

        `cached`: what this process last wrote, if it remembers the key, without asking the server.
        It may be stale (another process wrote since): then `write_if` fails, and only a
        successful `write_if` proves the value was current."""
        if cached and (hit := self._last_written.get(key)) is not None:
            return self._decoder.decode(hit[0]), hit[1]
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:
            return None, 0
        revision = entry.revision or 0
        return await self._decoded(key, entry.value, revision), revision

    async def write_if(self, key: str, value: T, revision: int) -> bool:
        """Write only if the key is still at `revision` (0: only if it does not exist); False if someone
        wrote it in between. For a change that needs I/O between the read and the write."""
        encoded = self._encoder.encode(value)
        try:
            written = await self._write(key, encoded, revision, value)
        except KeyWrongLastSequenceError:
            self.conflicts += 1
            self._last_written.pop(key, None)
            return False
        self._last_written.pop(key, None)  # re-inserted last: the cache drops the least recently written
        self._remember(key, encoded, written)
        return True

    def stored_size(self, key: str) -> int:
        """Bytes of the key's value as this process last wrote it; 0 if it does not remember it."""
        hit = self._last_written.get(key)
        return len(hit[0]) if hit is not None else 0

    def forget(self, key: str) -> None:
        """Drop what this process remembers of `key` (it will not write it again soon)."""
        self._last_written.pop(key, None)

    async def update(self, key: str, change: Callable[[T], R] | Callable[[T], Awaitable[R]],
                     default: Callable[[], T] | None = None) -> R:
        """Apply `change` to the current value (or `default()` for a new key) and write it
        atomically (compare-and-set).

        Concurrent updates of one key in this process are written together: one caller
        at a time leads, applies every change queued for the key in order, and writes
        once (a group commit), so replicas contend with each other, not with
        themselves. On a conflict every change of the batch runs again on the new value."""
        waiter = _Waiter(change, default)
        self._queued.setdefault(key, []).append(waiter)
        if key not in self._leaders:
            self._leaders.add(key)
            waiter.wake.set()
        try:
            await waiter.wake.wait()
        except BaseException:  # cancelled while queued
            self._leave(key, waiter)
            raise
        if not waiter.finished:  # our turn to lead: write everything queued so far
            batch = self._queued.pop(key)
            try:
                await self._commit(key, batch)
            finally:
                for other in batch:
                    if not other.finished:  # the leader was cancelled mid-write
                        other.finish(error=Contention(f"update of {key!r} interrupted", retry_after_s=0.1))
                self._hand_over(key)
        if waiter.error is not None:
            raise waiter.error
        return waiter.result

    async def _commit(self, key: str, batch: list[_Waiter]) -> None:
        for attempt in range(MAX_ATTEMPTS):
            default = next((w.default for w in batch if w.default), self.default)
            cached = self._last_written.pop(key, None) if attempt == 0 else None
            if cached is not None:  # what this process wrote last: try it without a read
                before, revision, value = cached
                if value is None:
                    value = self._decoder.decode(before)
            else:
                value, revision, before = await self._read(key, default)
            failed = False
            for waiter in batch:
                try:
                    result = waiter.change(value)
                    waiter.result = await result if inspect.isawaitable(result) else result
                except Exception as exc:  # noqa: BLE001 - handed to that caller
                    waiter.finish(error=exc)
                    failed = True
            if failed:  # a change that raised may have left the value half-changed: again without it
                batch = [w for w in batch if not w.finished]
                if not batch:
                    return
                continue
            after = self._encoder.encode(value)
            if after == before and cached is not None:
                continue  # "nothing to change" may be stale news: decide again on a fresh read
            if after != before:
                try:
                    written = await self._write(key, after, revision, value)
                except KeyWrongLastSequenceError:
                    self.conflicts += 1
                    await anyio.sleep(random.uniform(0, 0.001 * 2 ** min(attempt, 6)))
                    continue
                # the value object is kept unless a caller gets it back (a journal's update returns it)
                reusable = self.reuse_written and all(waiter.result is not value for waiter in batch)
                self._remember(key, after, written, value if reusable else None)
            for waiter in batch:
                waiter.finish(result=waiter.result)
            return
        for waiter in batch:
            waiter.finish(error=Contention(f"key {key!r} stayed contended for {MAX_ATTEMPTS} attempts",
                                           retry_after_s=0.5))

    async def _write(self, key: str, encoded: bytes, revision: int, value: T) -> int:
        """Write if the key is at `revision` (0: does not exist); its revision now. Raises on a conflict."""
        ttl = self._ttl(value)
        if ttl is None:
            return await self.kv.update(key, encoded, last=revision)
        # nats-py's public update takes no TTL (2.x): its _update does, the same request with a Nats-TTL header
        return await self.kv._update(key, encoded, last=revision, msg_ttl=ttl)

    def _ttl(self, value: T) -> float | None:
        return self.expires(value) if self.expires else None

    def _remember(self, key: str, value: bytes, revision: int, written: T | None = None) -> None:
        """Keep what we wrote, so the next update of the key can skip its read: a compare-and-set
        with this revision fails if anyone wrote since, and then it reads."""
        self._last_written[key] = (value, revision, written)
        if len(self._last_written) > LAST_WRITTEN_KEYS:
            self._last_written.pop(next(iter(self._last_written)))

    def _hand_over(self, key: str) -> None:
        """Wake the first caller queued for `key` to lead the next batch, or step down."""
        queued = self._queued.get(key)
        if queued:
            queued[0].wake.set()
        else:
            self._queued.pop(key, None)
            self._leaders.discard(key)

    def _leave(self, key: str, waiter: _Waiter) -> None:
        queued = self._queued.get(key, [])
        if waiter in queued:
            queued.remove(waiter)
        if waiter.wake.is_set() and not waiter.finished:  # it had been made leader: pass that on
            self._hand_over(key)

    async def scan(self, keys: str) -> AsyncIterator[tuple[str, T]]:
        """The current value of every key matching the pattern `keys` (e.g. "acct.>"), read in one pass."""
        watcher = await self.kv.watch(keys, ignore_deletes=True)
        try:
            async for entry in watcher:
                if entry is None:  # the end of what existed when the pass began
                    return
                value = await self._decoded(entry.key, entry.value, entry.revision or 0)
                if value is not None:
                    yield entry.key, value
        finally:
            await watcher.stop()

    async def _read(self, key: str, default: Callable[[], T]) -> tuple[T, int, bytes]:
        """(value, revision, its encoding as stored: to tell whether a change changed anything)."""
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:
            value = default()
            return value, 0, self._encoder.encode(value)
        revision = entry.revision or 0
        value = await self._decoded(key, entry.value, revision)
        return (default() if value is None else value), revision, entry.value

    async def _decoded(self, key: str, value: bytes, revision: int) -> T | None:
        """The stored value decoded; None, once quarantined, if it does not decode."""
        try:
            return self._decoder.decode(value)
        except msgspec.DecodeError as exc:
            await self.quarantine.keep(self.name, key, revision, value, exc)
            return None


def bucket_name(kv: KeyValue) -> str:
    """The bucket's name (nats-py 2.x keeps it private, as it does the stream and subject prefix)."""
    return getattr(kv, "_name", "?")

