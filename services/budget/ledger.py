"""The ledger of one user's UTC day: pure functions, no I/O.

    reserve(estimate)  at admission, only if committed + reserved + estimate <= limit
    post(step, used)   once per step id: committed += used, the reservation shrinks
    release(task)      at the end: what the task did not use returns to the budget

A task's reservation stays in `reserved` (at zero once released) for the rest of
the day, so a redelivered admission is recognised and never reserves twice.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import msgspec


class Ledger(msgspec.Struct, kw_only=True):
    committed: int = 0
    reserved: dict[str, int] = {}
    posted: dict[str, int] = {}

    @property
    def outstanding(self) -> int:
        return sum(self.reserved.values())

    def remaining(self, limit: int) -> int:
        return limit - self.committed - self.outstanding


def reserve(ledger: Ledger, task_id: str, amount: int, limit: int) -> bool:
    """Reserve `amount` for `task_id` if it fits; True if the task holds a reservation now."""
    if task_id in ledger.reserved:
        return True
    if amount > ledger.remaining(limit):
        return False
    ledger.reserved[task_id] = amount
    return True


def post(ledger: Ledger, task_id: str, step_id: str, used: int) -> bool:
    """Bill a step's usage once; False if this step was billed already."""
    if step_id in ledger.posted:
        return False
    ledger.posted[step_id] = used
    ledger.committed += used
    if task_id in ledger.reserved:
        ledger.reserved[task_id] = max(0, ledger.reserved[task_id] - used)
    return True


def release(ledger: Ledger, task_id: str) -> bool:
    """Return the task's unused reservation; False if nothing was held."""
    if ledger.reserved.get(task_id, 0) == 0:
        return False
    ledger.reserved[task_id] = 0
    return True


def day_window(now: datetime) -> str:
    return now.strftime("%Y%m%d")


def next_day(now: datetime) -> datetime:
    return (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
