"""executor service: TaskAdmitted and step outcomes in; StepRequested, TaskCompleted/TaskFailed out.

Also: a watch of the breaker bucket (which dependencies may be called), probe leases
asked of the breaker, the timeout sweep over its own task bucket, and the answer
cache for chains that end in a `cache` strategy.
"""

from __future__ import annotations

import os
import socket
from typing import Union

import anyio
import msgspec

from contracts import StepCompleted, StepFailed, TaskAdmitted
from contracts import subjects as s
from contracts.queries import TaskStatusQuery, TaskStatusReply
from contracts.boards import Board, ended_board_ttl
from contracts.approvals import ApprovalDecided
from services.executor import approvals
from services.executor.boards import BoardSupervisor
from services.executor.handlers import Executor
from services.executor.state import CachedAnswer, TaskRecord
from services.executor.sweep import TimeoutSweep
from shared.breakers import BreakerGate, BreakerView, lease_requester
from shared.bus import Bus
from shared.config import Settings
from shared.consume import Consumer, decoder_for
from shared.kv import TypedBucket
from shared.policy import PolicyView
from shared.quarantine import Quarantine
from shared.reservations import reservation_requester
from shared.slots import slots_bucket
from shared.runtime import micro_service
from shared.streams import EVENTS_MAX_AGE_S, consumer_config
from shared.watch import follow_bucket

NAME = "executor"
CACHE_TTL_S = 24 * 3600.0
ENDED_RECORD_TTL_S = EVENTS_MAX_AGE_S + 24 * 3600.0
"""A finished task's record is kept a day longer than any of its events can come back (it answers them)."""
SWEEP_MARGIN_S = 2.0
_query = msgspec.json.Decoder(TaskStatusQuery)


def _ended_record_ttl(record: TaskRecord) -> float | None:
    return None if record.status == "running" else ENDED_RECORD_TTL_S


async def run(settings: Settings, stop: anyio.Event) -> None:
    async with Bus.connect(settings, NAME) as bus:
        policy_kv, breaker_kv = await bus.policy_bucket(), await bus.bucket(s.KV_BREAKERS)
        tasks_kv, cache_kv = await bus.bucket(s.KV_TASKS), await bus.bucket(s.KV_CACHE, ttl_s=CACHE_TTL_S)
        boards_kv, slots_kv = await bus.bucket(s.KV_BOARDS), await bus.bucket(s.KV_SLOTS)
        quarantine = Quarantine(bus.js, NAME)
        policy, view = await PolicyView.load(policy_kv, quarantine), BreakerView(quarantine)
        replica = f"{socket.gethostname()}-{os.getpid()}-{id(view):x}"
        records = TypedBucket(tasks_kv, TaskRecord, lambda: None, expires=_ended_record_ttl, quarantine=quarantine)
        boards = TypedBucket(boards_kv, Board, lambda: None, expires=ended_board_ttl, quarantine=quarantine)
        executor = Executor(policy, records,
                            BreakerGate(view, lease_requester(bus.nc, replica)), bus.emit,
                            cache=TypedBucket(cache_kv, CachedAnswer, lambda: None, quarantine=quarantine),
                            boards=boards, reserve=reservation_requester(bus.nc),
                            slots=slots_bucket(slots_kv, quarantine),
                            republish_window_s=settings.dedup_window_s)
        supervisor = BoardSupervisor(boards, policy, bus.emit, executor.synthesise_board,
                                     note_end=executor.note_board_end)
        sweep = TimeoutSweep(executor.on_overdue, grace_s=settings.ack_wait_s + SWEEP_MARGIN_S,
                             on_throttled=executor.on_throttled)

        async def task_status(data: bytes) -> bytes:
            query = _query.decode(data)
            record = await executor.task_status(query.tenant, query.task_id)
            if record is None:
                return msgspec.json.encode(TaskStatusReply(task_id=query.task_id, found=False))
            waiting = approvals.waiting_ids(record)
            return msgspec.json.encode(TaskStatusReply(
                task_id=query.task_id, found=True, status="waiting_for_approval" if waiting else record.status, agent=record.task.spec.agent,
                attempt=record.attempt, attempts=record.attempts, usage=record.usage, strategy=record.strategy,
                step_id=record.step_id, waiting_for_approval=waiting))

        consumers = [
            Consumer(bus, s.STREAM_TASKS, consumer_config(settings, s.CONSUMER_EXECUTOR_TASKS, s.ALL_ADMITTED),
                     decoder_for(TaskAdmitted), executor.on_admitted),
            Consumer(bus, s.STREAM_STEPS,
                     consumer_config(settings, s.CONSUMER_EXECUTOR_STEPS, s.ALL_STEP_COMPLETED, s.ALL_STEP_FAILED),
                     decoder_for(Union[StepCompleted, StepFailed]), executor.on_step, long_running=True),
            Consumer(bus, s.STREAM_APPROVALS,
                     consumer_config(settings, s.CONSUMER_EXECUTOR_APPROVALS, s.ALL_APPROVAL_DECIDED),
                     decoder_for(ApprovalDecided), executor.on_approval),
        ]

        def stats() -> dict:
            return {"replica": replica, "breakers": view.snapshot(), "timeouts_swept": sweep.fired,
                    "hybrid_boards": len(supervisor.watched), "handed_over": supervisor.handed_over,
                    "consumers": {c.name: c.stats_dict() for c in consumers}, "policy": policy.stats(),
                    "quarantined": quarantine.stats()}

        endpoints = {"task": (s.EXECUTOR_TASK, task_status)}
        async with micro_service(bus, "runs admitted tasks down their fallback chains", endpoints, stats=stats), \
                anyio.create_task_group() as tg:
            tg.start_soon(policy.follow, policy_kv, stop)
            tg.start_soon(view.follow, breaker_kv, stop)
            tg.start_soon(follow_bucket, tasks_kv, sweep.apply, stop, ">", quarantine)
            tg.start_soon(sweep.run, stop)
            tg.start_soon(follow_bucket, boards_kv, supervisor.apply, stop, ">", quarantine)
            tg.start_soon(supervisor.run, stop)
            for consumer in consumers:
                tg.start_soon(consumer.run, stop)
