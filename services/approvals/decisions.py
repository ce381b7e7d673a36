"""What a decision or a deadline does to one approval record: pure functions, no I/O.

Each returns the event to publish (and changes the record in place), or raises the refusal. The caller writes
the record with compare-and-set before it publishes the event, so of two reviewers deciding at once one write
wins and the other, on its fresh read, is told who decided.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec

from contracts.approvals import Approval, ApprovalDecided, ApprovalReminder, ApprovalRequested, DecideApproval
from contracts.events import clip
from contracts.policy import ApprovalRules
from services.approvals.errors import AlreadyDecided, EditRefused, NotAReviewer, PastDeadline, ReasonMissing

_object = msgspec.json.Decoder(dict[str, Any]).decode
_OUTCOMES = {"approve": "approved", "deny": "denied", "edit": "edited"}


def opened(request: ApprovalRequested, rules: ApprovalRules, now: float) -> Approval:
    """A new approval: pending, with the first group and its deadline."""
    return Approval(request=request, opened_at=now, group=rules.group, deadline_at=now + rules.deadline_s,
                    arguments=request.arguments)


def at(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def decide(record: Approval, command: DecideApproval, reviewer: str, rules: ApprovalRules,
           now: float) -> ApprovalDecided | None:
    """Apply a reviewer's decision. None: this reviewer already made this very decision (a repeat: nothing new
    happens). Raises why it is refused otherwise."""
    outcome = _OUTCOMES[command.decision]
    if record.status != "pending":
        repeat = record.decided_by == reviewer and record.history and record.history[-1].outcome == outcome
        if repeat:
            return None
        by = f"by {record.decided_by}" if record.decided_by else "by its deadline"
        raise AlreadyDecided(f"approval {command.approval_id} was already {record.status} {by} at "
                             f"{at(record.decided_at)}" + (f": {record.reason}" if record.reason else ""))
    if now >= record.deadline_at:
        raise PastDeadline(f"approval {command.approval_id} is past its deadline ({at(record.deadline_at)}): "
                           f"too late to decide; its default action applies")
    members = rules.reviewers.get(record.group, [])
    if reviewer not in members:
        raise NotAReviewer(f"reviewer {reviewer!r} may not decide for tenant {record.request.tenant!r}: approval "
                           f"{command.approval_id} is for group {record.group!r} ({', '.join(members) or 'nobody'})")
    arguments = record.request.arguments
    if command.decision == "edit":
        arguments = _edited(command, rules, record)
    if command.decision == "deny" and not command.reason.strip():
        raise ReasonMissing("a denial needs a reason (--reason): the task fails with it")
    event = _event(record, outcome, reviewer=reviewer, reason=command.reason, arguments=arguments,
                   group=record.group)
    record.status = "approved" if outcome in ("approved", "edited") else "denied"
    record.decided_by, record.decided_at, record.reason, record.arguments = reviewer, now, command.reason, arguments
    return event


def _edited(command: DecideApproval, rules: ApprovalRules, record: Approval) -> str:
    if record.request.tool is None:
        raise EditRefused("this approval is of a whole step, not of a tool call: there are no arguments to edit")
    if not rules.allow_edit:
        raise EditRefused("this tenant's policy does not allow editing a call's arguments (approvals.allow_edit)")
    try:
        _object(command.arguments or "")
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as error:
        raise EditRefused(f"the edited arguments are not a JSON object: {error}") from None
    return command.arguments or "{}"


def on_time(record: Approval, rules: ApprovalRules, now: float) -> ApprovalDecided | ApprovalReminder | None:
    """What the clock does to a pending approval: past its deadline, the default action (deny as timed out, or
    one escalation to another group with a new deadline); before it, a reminder when one is due."""
    if record.status != "pending":
        return None
    if now >= record.deadline_at:
        if rules.on_timeout == "escalate" and rules.escalate_to and record.escalations == 0:
            record.group, record.deadline_at = rules.escalate_to, now + rules.escalation_deadline_s
            record.escalations += 1
            return _event(record, "escalated", reason=f"no decision by {at(now)}: escalated to {record.group}",
                          group=record.group, deadline_at=record.deadline_at)
        record.status, record.decided_at = "timed_out", now
        record.reason = f"no decision by the deadline ({at(record.deadline_at)})"
        return _event(record, "timed_out", reason=record.reason, group=record.group)
    every = rules.remind_every_s
    if every and now >= record.opened_at + (record.reminders + 1) * every:
        record.reminders += 1
        request = record.request
        return ApprovalReminder(task_id=request.task_id, tenant=request.tenant, user=request.user,
                                approval_id=request.approval_id, group=record.group,
                                deadline_at=record.deadline_at, seq=record.reminders)
    return None


def _event(record: Approval, outcome: str, **fields: Any) -> ApprovalDecided:
    request = record.request
    event = ApprovalDecided(task_id=request.task_id, tenant=request.tenant, user=request.user,
                            approval_id=request.approval_id, outcome=outcome, seq=len(record.history) + 1,
                            **{**fields, "reason": clip(fields.get("reason", ""))})
    record.history = [*record.history, event]
    return event
