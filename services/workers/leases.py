"""Single flight over every worker replica: a short lease per cache key, kept in the response cache's bucket.

A replica about to call the model for a request takes the lease of its key (a KV create of `lease.KEY`, with
a per-message TTL); a replica that finds the lease taken waits for the answer to be stored under the key,
reading it as a coalesced hit. The holder stores its answer, then gives the lease back (a delete): so a
waiter that sees the lease gone and finds no answer knows none is coming (the step failed, or its answer is
not kept) and calls the model itself. A holder that dies lets its lease lapse at its TTL.

Lease keys have four tokens (`lease.TENANT.AGENT.DIGEST`): the cache's lookups (`TENANT.AGENT.*`) and the
semantic index's watch (`*.AGENT.*`) never see them, and the tenant and agent are in the key as in an entry's.
"""

from __future__ import annotations

import logging

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

log = logging.getLogger(__name__)
PREFIX = "lease."


def lease_key(entry_key: str) -> str:
    return PREFIX + entry_key


class Leases:
    def __init__(self, kv: KeyValue, holder: str) -> None:
        self.kv = kv
        self.holder = holder.encode()[:200]
        """Who holds a lease (the worker's id), for an operator reading the bucket."""

    async def take(self, key: str, ttl_s: float) -> int | None:
        """The lease's revision if this replica now holds it; None if another one does."""
        try:
            return await self.kv.create(lease_key(key), self.holder, msg_ttl=max(1.0, round(ttl_s)))
        except KeyWrongLastSequenceError:
            return None

    async def held(self, key: str) -> bool:
        try:
            entry = await self.kv.get(lease_key(key))
        except KeyNotFoundError:  # given back (a delete marker), or lapsed
            return False
        return entry.value is not None

    async def give_back(self, key: str, revision: int) -> None:
        try:
            await self.kv.delete(lease_key(key), last=revision)
        except Exception as error:  # noqa: BLE001 - lapsed and taken again since, or gone: either way not ours
            log.info("response cache: lease of %s not given back (%s); it lapses at its TTL", key, error)
