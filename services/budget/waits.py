"""A task waiting for a person keeps its reservation: its holds do not expire while an approval is pending.

The budget hears the approvals' events (CORRAL_APPROVALS): a request marks the task's holds in both accounts
waiting (the expiry sweep passes them by); the decision that ends the wait (approved, edited, denied, timed out)
clears the mark and restarts the hold's clock, so the hold timeout counts from there. An escalation or a
reminder leaves the hold waiting. The wait is bounded by the approval's deadline, which always ends it.
"""

from __future__ import annotations

from functools import partial

from contracts.approvals import ApprovalDecided, ApprovalEvent, ApprovalRequested
from services.budget.handlers import Budget, tenant_key, user_key
from services.budget.ledger import Account

WAIT_ENDS = frozenset({"approved", "edited", "denied", "timed_out"})


def mark(account: Account, task_id: str, waiting: bool, now: float) -> bool:
    """Mark the task's open hold waiting or not (not: its clock restarts now); False if it has none."""
    hold = account.holds.get(task_id)
    if hold is None or hold.closed:
        return False
    if not waiting and hold.waiting:
        hold.since = now
    hold.waiting = waiting
    return True


async def on_approval(budget: Budget, event: ApprovalEvent) -> None:
    if isinstance(event, ApprovalRequested):
        waiting = True
    elif isinstance(event, ApprovalDecided) and event.outcome in WAIT_ENDS:
        waiting = False
    else:
        return
    now = budget.clock().timestamp()
    for key in (user_key(event.tenant, event.user), tenant_key(event.tenant)):
        await budget.accounts.update(key, partial(mark, task_id=event.task_id, waiting=waiting, now=now))
