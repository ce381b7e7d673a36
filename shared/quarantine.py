"""State that does not decode is quarantined, not fatal.

A value read from a KV bucket that does not decode as its record type (not JSON, the
wrong shape, a newer version this code cannot read) is quarantined:

- logged with its bucket, key and revision, and counted (`quarantined` in the service's
  `$SRV.STATS`);
- kept as a dead letter in the dead-letter stream (`corral.dlq.<service>`, its subject
  the value's own, `$KV.<bucket>.<key>`, its bytes the payload), once per revision:
  the Nats-Msg-Id names bucket, key and revision, so every replica and every service
  that meets the same value adds a single letter between them (within the stream's
  duplicate window; each process also remembers what it kept);
- then skipped. What the service does next is its own choice, and each owner makes it
  knowingly: a bucket's owner replaces the value at its next write (shared/kv.py), a
  view keeps what it knew (shared/watch.py, shared/policy.py).

The value is replaced only once its letter is stored (`keep` raises TransientError
when the stream does not take it), so its bytes are never lost.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

import msgspec
from nats.errors import Error as NatsError

from contracts import DeadLetter, subjects
from shared.errors import TransientError

log = logging.getLogger(__name__)
REMEMBERED = 4096  # (bucket, key, revision) this process has kept, so it keeps each once
_encode = msgspec.json.Encoder().encode


class BucketCount(msgspec.Struct):
    """What one bucket's quarantine counted, for $SRV.STATS."""

    values: int = 0
    last_key: str = ""
    last_revision: int = 0
    last_reason: str = ""


class Quarantine:
    """Where one process reports the bucket values it cannot decode. Without a JetStream context
    (`js`: tests, tools) it logs and counts only."""

    def __init__(self, js: Any = None, service: str = "") -> None:
        self.js = js
        self.service = service
        self.counts: dict[str, BucketCount] = {}
        self.unkept = 0  # letters the stream did not take (the value stays where it was)
        self._kept: OrderedDict[tuple[str, str, int], None] = OrderedDict()

    async def keep(self, bucket: str, key: str, revision: int, value: bytes, error: Exception) -> None:
        """Report `value`, the revision `revision` of `key`, as undecodable: once per revision in this process."""
        seen = (bucket, key, revision)
        if seen in self._kept:
            return
        reason = f"value of {bucket} key {key!r} revision {revision} does not decode: {error}"
        log.error("quarantined %s (%d bytes, starting %r)", reason, len(value), value[:64])
        await self._letter(bucket, key, revision, value, reason)
        count = self.counts.setdefault(bucket, BucketCount())
        count.values += 1
        count.last_key, count.last_revision, count.last_reason = key, revision, str(error)
        self._kept[seen] = None
        if len(self._kept) > REMEMBERED:
            self._kept.popitem(last=False)

    async def _letter(self, bucket: str, key: str, revision: int, value: bytes, reason: str) -> None:
        if self.js is None:
            return
        letter = DeadLetter.of(self.service, f"$KV.{bucket}.{key}", reason, value, deliveries=0)
        msg_id = f"quarantine:{bucket}:{key}:{revision}"
        try:
            await self.js.publish(subjects.dead_letter(self.service), _encode(letter),
                                  headers={subjects.HEADER_MSG_ID: msg_id})
        except NatsError as exc:  # the server is away: the value stays in its bucket until the letter is kept
            self.unkept += 1
            log.warning("could not keep the dead letter of %s key %r revision %d: %r", bucket, key, revision, exc)
            raise TransientError(f"dead letter of {bucket} key {key!r} not stored: {exc!r}") from exc

    async def note(self, bucket: str, key: str, revision: int, value: bytes, error: Exception) -> None:
        """`keep`, for a reader that never replaces the value (a view, or a bucket it does not own): if the
        stream does not take the letter, that is counted and logged, and the reader goes on."""
        try:
            await self.keep(bucket, key, revision, value, error)
        except TransientError:
            pass

    def stats(self) -> dict[str, Any]:
        return {"buckets": {bucket: msgspec.structs.asdict(count) for bucket, count in self.counts.items()},
                "unkept": self.unkept}
