"""A live, read-only view of every breaker, following the breaker service's KV bucket."""

from __future__ import annotations

import logging
import time

import anyio
import msgspec
from nats.errors import TimeoutError as NatsTimeout
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from contracts.state import BreakerRecord

log = logging.getLogger(__name__)
_decode = msgspec.json.Decoder(BreakerRecord).decode


class BreakerView:
    def __init__(self) -> None:
        self.records: dict[str, BreakerRecord] = {}

    def allows(self, dependency: str, now: float | None = None) -> bool:
        record = self.records.get(dependency)
        return record is None or record.allows_calls(time.time() if now is None else now)

    def apply(self, key: str, value: bytes | None) -> None:
        if value:
            self.records[key] = _decode(value)
        else:
            self.records.pop(key, None)

    async def follow(self, kv: KeyValue, stop: anyio.Event) -> None:
        """Keep `records` up to date until `stop` is set."""
        watcher = await kv.watchall()
        try:
            while not stop.is_set():
                try:
                    entry = await watcher.updates(timeout=1.0)
                except NatsTimeout:
                    continue
                if entry is None:  # end of the initial values
                    continue
                self.apply(entry.key, None if entry.operation in (KV_DEL, KV_PURGE) else entry.value)
        finally:
            await watcher.stop()
