"""approvals: keep one record per approval request, decide it once, apply deadlines, announce every change.

The approvals service alone writes the `corral_approvals` bucket (key `<tenant>.<approval id>`). Every change
is a compare-and-set on one record, then the event that tells it (ApprovalDecided, ApprovalReminder), then a
second write that marks it announced: a replica that dies in between leaves the record unannounced, and the
next tick (on any replica) publishes it again, which the stream drops if it had landed (its Nats-Msg-Id).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from contracts import subjects
from contracts.approvals import (
    Approval,
    ApprovalDecided,
    ApprovalEvents,
    ApprovalHistory,
    ApprovalList,
    ApprovalReminder,
    ApprovalReply,
    ApprovalRequested,
    DecideApproval,
    ListApprovals,
    ShowApproval,
    approval_key,
)
from contracts.policy import Policy
from services.approvals import decisions
from services.approvals.errors import ApprovalError, UnknownApproval
from shared.kv import Contention, TypedBucket

log = logging.getLogger(__name__)
Emit = Callable[[str, Any], Awaitable[None]]
Clock = Callable[[], float]
CAS_ATTEMPTS = 8


class Approvals:
    def __init__(self, policy: Callable[[], Policy], records: TypedBucket[Approval], emit: Emit,
                 clock: Clock) -> None:
        self.policy = policy
        self.records = records
        self.emit = emit
        self.clock = clock
        self.refused = 0

    async def on_requested(self, request: ApprovalRequested) -> None:
        """Open the record (once: a redelivered request finds it there)."""
        rules = self.policy().approvals_for(request.tenant)
        await self.records.create(approval_key(request.tenant, request.approval_id),
                                  decisions.opened(request, rules, self.clock()))

    async def decide(self, command: DecideApproval, reviewer: str) -> ApprovalReply:
        key = approval_key(command.tenant, command.approval_id)
        rules = self.policy().approvals_for(command.tenant)
        try:
            record, event = await self._change(key, lambda record: decisions.decide(
                record, command, reviewer, rules, self.clock()))
        except ApprovalError as refusal:
            self.refused += 1
            log.info("approval %s: refused %s by %s: %s", command.approval_id, command.decision, reviewer, refusal)
            return ApprovalReply(ok=False, message=str(refusal), approval=await self.records.get(key))
        if event is None:
            return ApprovalReply(ok=True, approval=record,
                                 message=f"approval {command.approval_id} was already {record.status} by you")
        return ApprovalReply(ok=True, approval=record, message=f"approval {command.approval_id}: {event.outcome}")

    async def show(self, query: ShowApproval) -> ApprovalReply:
        record = await self.records.get(approval_key(query.tenant, query.approval_id))
        if record is None:
            return ApprovalReply(ok=False, message=f"no approval {query.approval_id} in tenant {query.tenant!r}")
        return ApprovalReply(ok=True, approval=record)

    async def list(self, query: ListApprovals) -> ApprovalList:
        found = [record async for _, record in self.records.scan(f"{query.tenant}.*" if query.tenant else ">")
                 if query.status is None or record.status == query.status]
        found.sort(key=lambda record: record.opened_at)
        return ApprovalList(approvals=found[:query.limit])

    async def history(self, query: ApprovalHistory) -> ApprovalEvents:
        events: list[ApprovalRequested | ApprovalDecided | ApprovalReminder] = []
        async for _, record in self.records.scan(f"{query.tenant}.*" if query.tenant else ">"):
            if query.task_id is None or record.request.task_id == query.task_id:
                events += [record.request, *record.history]
        events.sort(key=lambda event: event.occurred_at)
        return ApprovalEvents(events=events[-query.limit:])

    async def tick(self) -> None:
        """Apply deadlines and reminders to pending approvals; announce what a dead replica left unannounced."""
        now = self.clock()
        async for key, record in self.records.scan(">"):
            if record.unannounced:
                await self._announce(key, record)
            elif record.status == "pending":
                rules = self.policy().approvals_for(record.request.tenant)
                if decisions.on_time(record, rules, now) is not None:  # a trial on a copy: is anything due?
                    await self._change(key, lambda fresh: decisions.on_time(fresh, rules, now))

    async def _change(self, key: str, change: Callable[[Approval], Any]) -> tuple[Approval, Any]:
        """Apply `change` to the fresh record and write it (compare-and-set), then publish what it returned."""
        for _ in range(CAS_ATTEMPTS):
            record, revision = await self.records.read(key)
            if record is None:
                raise UnknownApproval(f"no approval {key.partition('.')[2]} in tenant {key.partition('.')[0]!r}")
            event = change(record)
            if event is None:
                if record.unannounced:
                    await self._announce(key, record)
                return record, None
            if isinstance(event, ApprovalReminder):
                if await self.records.write_if(key, record, revision):
                    await self.emit(subjects.approval_reminder(event.tenant), event)
                    return record, event
                continue
            if await self.records.write_if(key, record, revision):
                await self._announce(key, record)
                return record, event
        raise Contention(f"approval {key} changed under {CAS_ATTEMPTS} writes in a row", retry_after_s=0.2)

    async def _announce(self, key: str, record: Approval) -> None:
        """Publish the record's decisions not yet announced (the stream keeps each once), then say so in it."""
        for event in record.unannounced:
            await self.emit(subjects.approval_decided(event.tenant), event)
        for _ in range(CAS_ATTEMPTS):
            fresh, revision = await self.records.read(key)
            if fresh is None or fresh.announced >= len(record.history):
                return
            fresh.announced = len(record.history)
            if await self.records.write_if(key, fresh, revision):
                record.announced = fresh.announced
                return
