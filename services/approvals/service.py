"""approvals service: ApprovalRequested in; approval records in `corral_approvals`; ApprovalDecided and
ApprovalReminder out.

Endpoints (NATS micro, one replica answers each request): `corral.approvals.list`, `.show`, `.history`, and
`corral.approvals.decide.<reviewer>`, where the subject's last token is the reviewer: nats-server lets each
reviewer's identity publish on its own subject only (services/auth.py), so that token is who decided. A tick
applies deadlines, escalations and reminders.
"""

from __future__ import annotations

import logging
import time

import anyio
import msgspec
from nats.micro.request import Request

from contracts import subjects as s
from contracts.approvals import (
    Approval,
    ApprovalHistory,
    ApprovalRequested,
    DecideApproval,
    ListApprovals,
    ShowApproval,
)
from services.approvals.handlers import Approvals
from shared.bus import Bus
from shared.config import Settings
from shared.consume import Consumer, decoder_for
from shared.kv import TypedBucket
from shared.policy import PolicyView
from shared.quarantine import Quarantine
from shared.runtime import micro_service
from shared.streams import consumer_config

log = logging.getLogger(__name__)
NAME = "approvals"
TICK_S = 0.5
_decide = msgspec.json.Decoder(DecideApproval).decode
_list = msgspec.json.Decoder(ListApprovals).decode
_show = msgspec.json.Decoder(ShowApproval).decode
_history = msgspec.json.Decoder(ApprovalHistory).decode
_encode = msgspec.json.encode


DECIDED_KEPT_S = 30 * 86_400.0
"""A decided approval's record is kept as long as its events (CORRAL_APPROVALS): the audit outlives neither."""


def _kept_for(record: Approval) -> float | None:
    return None if record.status == "pending" else DECIDED_KEPT_S


async def run(settings: Settings, stop: anyio.Event, clock=time.time) -> None:
    async with Bus.connect(settings, NAME) as bus:
        kv, policy_kv = await bus.bucket(s.KV_APPROVALS), await bus.policy_bucket()
        quarantine = Quarantine(bus.js, NAME)
        policy = await PolicyView.load(policy_kv, quarantine)
        records = TypedBucket(kv, Approval, lambda: None, expires=_kept_for, quarantine=quarantine)
        approvals = Approvals(policy, records, bus.emit, clock=clock)
        requests = Consumer(bus, s.STREAM_APPROVALS,
                            consumer_config(settings, s.CONSUMER_APPROVALS, s.ALL_APPROVAL_REQUESTED),
                            decoder_for(ApprovalRequested), approvals.on_requested)

        async def listed(data: bytes) -> bytes:
            return _encode(await approvals.list(_list(data)))

        async def shown(data: bytes) -> bytes:
            return _encode(await approvals.show(_show(data)))

        async def history(data: bytes) -> bytes:
            return _encode(await approvals.history(_history(data)))

        async def decide(request: Request) -> None:
            reviewer = s.decide_reviewer(request.subject)
            try:
                if reviewer is None:
                    raise ValueError(f"{request.subject!r} names no reviewer")
                await request.respond(_encode(await approvals.decide(_decide(request.data), reviewer)))
            except Exception as exc:  # a bad command gets an error reply, never kills the service
                await request.respond_error("400", f"{type(exc).__name__}: {exc}")

        async def tick() -> None:
            while not stop.is_set():
                try:
                    await approvals.tick()
                except Exception:  # the next tick tries again; a deadline is late, not lost
                    log.exception("approvals tick failed")
                with anyio.move_on_after(TICK_S):
                    await stop.wait()

        def stats() -> dict:
            return {"consumer": requests.stats_dict(), "refused": approvals.refused, "policy": policy.stats(),
                    "quarantined": quarantine.stats()}

        endpoints = {"list": (s.APPROVALS_LIST, listed), "show": (s.APPROVALS_SHOW, shown),
                     "history": (s.APPROVALS_HISTORY, history)}
        async with micro_service(bus, "human approvals: requests, decisions, deadlines", endpoints,
                                 stats=stats) as service, anyio.create_task_group() as tg:
            await service.add_endpoint(name="decide", subject=s.APPROVALS_DECIDE_ANY, handler=decide)
            tg.start_soon(policy.follow, policy_kv, stop)
            tg.start_soon(tick)
            await requests.run(stop)
            tg.cancel_scope.cancel()
