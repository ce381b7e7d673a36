"""A publisher's view of Corral: submit tasks, follow them to their end, ask for status.

Terminal events are heard on a core subscription opened before publishing, so
none is missed; the stream keeps them anyway for anyone who comes later.

Connected with a tenant's credential (`connect(..., tenant=T)`), it may only submit
T's tasks and follow them (`submit`, `run`, `events(tenant=T)`); the operator's
credential may do the rest.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any, Union

import anyio
import msgspec
from nats.aio.msg import Msg
from nats.js.errors import NoKeysError

from contracts import (
    BreakerChanged,
    TaskCompleted,
    TaskFailed,
    TaskProgress,
    TaskRejected,
    TaskSpec,
    TaskSubmitted,
    subjects,
)
from contracts.approvals import (
    ApprovalEvents,
    ApprovalHistory,
    ApprovalList,
    ApprovalReply,
    DecideApproval,
    ListApprovals,
    ShowApproval,
)
from contracts.events import TASK_EVENTS
from contracts.commands import ControlBreaker, SimulateDependency
from contracts.queries import (
    AlertsQuery,
    AlertsReply,
    SilenceAlert,
    BreakerReply,
    BudgetQuery,
    BudgetReply,
    CostQuery,
    CostReply,
    SimulationAck,
    StatusReport,
    TaskStatusQuery,
    TaskStatusReply,
)
from contracts.state import BreakerRecord
from shared import tracing
from shared.bus import Bus
from shared.config import Settings
from shared.errors import CorralError
from shared.kv import TypedBucket

TERMINAL = (TaskCompleted, TaskFailed, TaskRejected)
Terminal = TaskCompleted | TaskFailed | TaskRejected
_event = msgspec.json.Decoder(Union[(*TASK_EVENTS, BreakerChanged)])
EXPECTED_REPLIES_WAIT_S = 10.0
"""How long a gather waits for the replies it expects: they usually come within milliseconds, but a replica
on a busy machine may take longer than a gather without expectations waits."""


def new_task_id() -> str:
    return uuid.uuid4().hex


class Client:
    def __init__(self, bus: Bus, tenant: str | None = None) -> None:
        self.bus = bus
        self.tenant = tenant
        """The tenant whose publisher this connection is; None: the operator's."""

    @classmethod
    @asynccontextmanager
    async def connect(cls, settings: Settings, name: str = "client", *,
                      tenant: str | None = None, reviewer: str | None = None) -> AsyncIterator[Client]:
        """Connect as an operator, or with `tenant` as that tenant's publisher, or with `reviewer` as that
        reviewer (settings.nats_credentials is then its credential)."""
        inbox = subjects.reviewer_inbox(reviewer) if reviewer else None
        async with Bus.connect(settings, name, tenant=tenant, inbox=inbox) as bus:
            yield cls(bus, tenant)

    async def submit(self, spec: TaskSpec, *, tenant: str, user: str, task_id: str | None = None) -> str:
        """Publish a task; returns its id once the stream has stored it. Starts the task's trace.

        Submitting the same task id again (a retry after a lost acknowledgement) is safe: the guard
        de-duplicates per (tenant, task id). So no `Nats-Msg-Id` is sent: on the ingress stream, ids are
        chosen by every publisher, and one tenant's could make the stream drop another's message."""
        if self.tenant is not None and tenant != self.tenant:
            raise CorralError(f"this connection is tenant {self.tenant!r}'s: it may submit only its tasks, "
                              f"not {tenant!r}'s (the server would refuse it)")
        task = TaskSubmitted(task_id=task_id or new_task_id(), tenant=tenant, user=user, spec=spec)
        with tracing.producing("corral submit", {"corral.task_id": task.task_id, "corral.agent": spec.agent}):
            await self.bus.emit(subjects.task_submitted(tenant), task, msg_id=False)
        return task.task_id

    @asynccontextmanager
    async def events(self, breakers: bool = False, ends_only: bool = False,
                     tenant: str | None = None) -> AsyncIterator[anyio.abc.ObjectReceiveStream]:
        """A stream of every task event (only their ends with `ends_only`; with `breakers`, every
        BreakerChanged too) published while the block runs. With `tenant`, only that tenant's ends and
        progress: all a tenant's credential may hear."""
        send, receive = anyio.create_memory_object_stream[object](max_buffer_size=100_000)

        async def on_msg(msg: Msg) -> None:
            try:
                send.send_nowait(_event.decode(msg.data))
            except (msgspec.DecodeError, msgspec.ValidationError, anyio.WouldBlock):
                pass  # not ours to judge: the guard dead-letters bad submissions

        if tenant is not None:
            tasks = [subjects.task_completed(tenant), subjects.task_failed(tenant), subjects.task_rejected(tenant),
                     *([] if ends_only else [subjects.tenant_progress(tenant)])]
        elif ends_only:
            tasks = [subjects.ALL_COMPLETED, subjects.ALL_FAILED, subjects.ALL_REJECTED]
        else:
            tasks = [subjects.ALL_TASK_EVENTS]
        heard = [*tasks, *([subjects.ALL_BREAKER] if breakers else [])]
        subs = [await self.bus.nc.subscribe(subject, cb=on_msg, pending_msgs_limit=1_000_000) for subject in heard]
        try:
            yield receive
        finally:
            for sub in subs:
                await sub.unsubscribe()
            send.close()

    async def run(self, spec: TaskSpec, *, tenant: str, user: str, timeout: float = 60.0,
                  on_progress=None, task_id: str | None = None) -> Terminal:
        """Submit and wait for the task's terminal event (calling `on_progress` for progress)."""
        async with self.events(tenant=tenant) as events:
            task_id = await self.submit(spec, tenant=tenant, user=user, task_id=task_id)
            with anyio.fail_after(timeout):
                async for event in events:
                    if (event.tenant, event.task_id) != (tenant, task_id):  # another tenant may use the same id
                        continue
                    if isinstance(event, TaskProgress) and on_progress:
                        on_progress(event)
                    if isinstance(event, TERMINAL):
                        return event
        raise AssertionError("event stream ended")

    async def _gather(self, subject: str, gather_s: float, payload: bytes = b"", expect: int | None = None,
                      ) -> list[dict]:
        """Every reply to one request within `gather_s` (micro verbs reach every replica); stop early once
        `expect` replies came."""
        inbox = self.bus.nc.new_inbox()
        replies: list[dict] = []
        sub = await self.bus.nc.subscribe(inbox)
        try:
            await self.bus.nc.publish(subject, payload, reply=inbox)
            with anyio.move_on_after(gather_s):
                async for msg in sub.messages:
                    if msg.data:  # an empty one is the server's "no responders"
                        replies.append(msgspec.json.decode(msg.data))
                    if expect is not None and len(replies) >= expect:
                        break
        finally:
            await sub.unsubscribe()
        return replies

    async def running_services(self, gather_s: float = 0.25) -> Counter[str]:
        """Replicas per service name that answer `$SRV.PING` (NATS micro services)."""
        return Counter(reply.get("name", "?") for reply in await self._gather("$SRV.PING", gather_s))

    async def replica_stats(self, service: str, gather_s: float | None = None, expect: int | None = None,
                            ) -> list[dict]:
        """The `$SRV.STATS` reply of every replica of `service` (e.g. "corral-guard"): all that answer within
        `gather_s` (default 0.25 s); with `expect`, the first `expect`, waiting up to `gather_s` (default 10 s)
        for them."""
        return await self._gather(f"$SRV.STATS.{service}", _gather_s(gather_s, expect, 0.25), expect=expect)

    async def wait_ready(self, names: Iterable[str], timeout: float = 90.0) -> None:
        """Wait until every named micro service answers a ping."""
        wanted = set(names)
        with anyio.fail_after(timeout):
            while wanted - set(await self.running_services()):
                pass  # each round already waited `gather_s` for answers

    async def wait_policy(self, version: int, names: Iterable[str], timeout: float = 30.0) -> None:
        """Wait until every replica of each named micro service that answers says it follows policy `version`
        or a later one (its $SRV.STATS `policy.version`)."""
        with anyio.fail_after(timeout):
            for name in names:
                while not all(_policy_version(reply) >= version for reply in await self.replica_stats(name)):
                    await anyio.sleep(0.05)

    async def status(self, timeout: float = 5.0) -> StatusReport:
        reply = await self.bus.nc.request(subjects.MONITOR_STATUS, b"{}", timeout=timeout)
        return msgspec.json.decode(reply.data, type=StatusReport)

    async def alerts(self, history: bool = False, timeout: float = 5.0) -> AlertsReply:
        """The monitor's firing alerts (and, with `history`, its latest firings and resolutions)."""
        reply = await self.bus.nc.request(subjects.MONITOR_ALERTS, msgspec.json.encode(AlertsQuery(history=history)),
                                          timeout=timeout)
        return msgspec.json.decode(reply.data, type=AlertsReply)

    async def silence(self, rule: str, for_s: float, by: str = "", timeout: float = 5.0) -> AlertsReply:
        command = msgspec.json.encode(SilenceAlert(rule=rule, for_s=for_s, by=by))
        reply = await self.bus.nc.request(subjects.MONITOR_SILENCE, command, timeout=timeout)
        return msgspec.json.decode(reply.data, type=AlertsReply)

    async def simulate(self, command: SimulateDependency, expect: int | None = None,
                       gather_s: float | None = None) -> list[SimulationAck]:
        """Tell every SIMULATED worker replica how a dependency behaves; their acknowledgements: all that
        answer within `gather_s` (default 1 s); with `expect`, the first `expect`, waiting up to `gather_s`
        (default 10 s) for them, so that a caller can rely on the change being in effect."""
        replies = await self._gather(subjects.SIM_CONTROL, _gather_s(gather_s, expect, 1.0),
                                     msgspec.json.encode(command), expect)
        return [msgspec.convert(reply, SimulationAck) for reply in replies]

    async def control_breaker(self, command: ControlBreaker, timeout: float = 5.0) -> BreakerReply:
        reply = await self.bus.nc.request(subjects.BREAKER_CONTROL, msgspec.json.encode(command), timeout=timeout)
        if not reply.data:
            raise CorralError(f"the breaker refused: {reply.headers}")
        return msgspec.json.decode(reply.data, type=BreakerReply)

    async def breakers(self) -> list[BreakerRecord]:
        """Every circuit, as the breaker service keeps it (read-only; a record that does not decode is logged
        and left out)."""
        kv = await self.bus.bucket(subjects.KV_BREAKERS)
        records = TypedBucket(kv, BreakerRecord, BreakerRecord)
        found = [await records.get(key) for key in await _keys(kv)]
        return sorted((record for record in found if record is not None), key=lambda record: record.dependency)

    async def task_status(self, task_id: str, timeout: float = 5.0, *, tenant: str = "default") -> TaskStatusReply:
        query = msgspec.json.encode(TaskStatusQuery(task_id=task_id, tenant=tenant))
        reply = await self.bus.nc.request(subjects.EXECUTOR_TASK, query, timeout=timeout)
        return msgspec.json.decode(reply.data, type=TaskStatusReply)

    async def budget(self, tenant: str, user: str, timeout: float = 5.0) -> BudgetReply:
        """The user's and their tenant's budget windows, as the budget service books them."""
        query = msgspec.json.encode(BudgetQuery(tenant=tenant, user=user))
        reply = await self.bus.nc.request(subjects.BUDGET_SHOW, query, timeout=timeout)
        return msgspec.json.decode(reply.data, type=BudgetReply)

    async def cost(self, task_id: str, timeout: float = 5.0, *, tenant: str = "default") -> CostReply:
        """A task's tokens and cost per step and model, from the budget service."""
        query = msgspec.json.encode(CostQuery(task_id=task_id, tenant=tenant))
        reply = await self.bus.nc.request(subjects.BUDGET_COST, query, timeout=timeout)
        return msgspec.json.decode(reply.data, type=CostReply)


    # --- approvals (services/approvals): any client may decide, as the identity it signed in with ---

    async def _approvals(self, subject: str, command: msgspec.Struct, reply_type: type, timeout: float) -> Any:
        reply = await self.bus.nc.request(subject, msgspec.json.encode(command), timeout=timeout)
        if reply.headers and reply.headers.get("Nats-Service-Error"):
            raise CorralError(f"the approvals service refused: {reply.headers['Nats-Service-Error']}")
        return msgspec.json.decode(reply.data, type=reply_type)

    async def decide_approval(self, command: DecideApproval, *, reviewer: str, timeout: float = 5.0) -> ApprovalReply:
        """Send a decision as `reviewer`: the server lets an identity send on its own reviewer subject only."""
        return await self._approvals(subjects.approvals_decide(reviewer), command, ApprovalReply, timeout)

    async def approvals(self, query: ListApprovals, timeout: float = 5.0) -> ApprovalList:
        return await self._approvals(subjects.APPROVALS_LIST, query, ApprovalList, timeout)

    async def approval(self, query: ShowApproval, timeout: float = 5.0) -> ApprovalReply:
        return await self._approvals(subjects.APPROVALS_SHOW, query, ApprovalReply, timeout)

    async def approval_history(self, query: ApprovalHistory, timeout: float = 5.0) -> ApprovalEvents:
        return await self._approvals(subjects.APPROVALS_HISTORY, query, ApprovalEvents, timeout)


def _policy_version(stats: dict) -> int:
    endpoints = stats.get("endpoints") or [{}]
    return int(((endpoints[0].get("data") or {}).get("policy") or {}).get("version", 0))


def _gather_s(gather_s: float | None, expect: int | None, default: float) -> float:
    if gather_s is not None:
        return gather_s
    return default if expect is None else EXPECTED_REPLIES_WAIT_S


async def _keys(kv) -> list[str]:
    try:
        return await kv.keys()
    except NoKeysError:
        return []
