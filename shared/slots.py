"""A tenant's running subtasks, over every task and every coordinator: `orchestration.max_parallel_per_tenant`.

One record per tenant in the `corral_slots` bucket holds a slot per running part (a subtask of a plan), keyed
`<task ref>/<subtask id>`, with the time it lapses: the task's deadline. The executor (centralized) takes one
before it starts a subtask, and the pool member that claims one (distributed, hybrid) takes it before its claim;
each gives it back when the part ends. Every change is a compare-and-set, so the limit is exact over replicas.
Taking a slot that is held already only renews it (a redelivered event, a claim taken over), so a part holds
one slot whoever asks. A holder that dies with a slot loses it at the task's deadline at the latest.
"""

from __future__ import annotations

import msgspec

from shared.kv import TypedBucket

IDLE_TTL_S = 24 * 3600.0
"""A tenant's record with no slot held expires a day after its last change."""


class TenantSlots(msgspec.Struct, kw_only=True):
    held: dict[str, float] = {}
    """Holder (`<task ref>/<subtask id>`) -> unix seconds at which its slot lapses."""


def holder(task_ref: str, part: str) -> str:
    return f"{task_ref}/{part}"


def take(slots: TenantSlots, who: str, until: float, now: float, limit: int) -> bool:
    """Give `who` a slot until `until` if one is free (its own counts as free); lapsed slots are dropped."""
    slots.held = {other: lapses for other, lapses in slots.held.items() if lapses > now}
    if who not in slots.held and len(slots.held) >= limit:
        return False
    slots.held[who] = max(until, slots.held.get(who, 0.0))
    return True


def give_back(slots: TenantSlots, who: str) -> None:
    slots.held.pop(who, None)


class Slots:
    """The slots of every tenant, in their bucket."""

    def __init__(self, bucket: TypedBucket[TenantSlots]) -> None:
        self.bucket = bucket

    async def take(self, tenant: str, who: str, until: float, now: float, limit: int) -> bool:
        return await self.bucket.update(tenant, lambda slots: take(slots, who, until, now, limit))

    async def give_back(self, tenant: str, who: str) -> None:
        await self.bucket.update(tenant, lambda slots: give_back(slots, who))


def idle_ttl(slots: TenantSlots) -> float | None:
    return None if slots.held else IDLE_TTL_S


def slots_bucket(kv, quarantine=None) -> Slots:
    return Slots(TypedBucket(kv, TenantSlots, TenantSlots, expires=idle_ttl, quarantine=quarantine))
