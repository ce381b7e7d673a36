"""executor service: TaskAdmitted and step outcomes in; StepRequested, TaskCompleted/TaskFailed out."""

from __future__ import annotations

from typing import Union

import anyio
import msgspec

from contracts import StepCompleted, StepFailed, TaskAdmitted
from contracts import subjects as s
from contracts.queries import TaskStatusQuery, TaskStatusReply
from services.executor.handlers import Executor
from services.executor.state import TaskRecord
from shared.breakers import BreakerView
from shared.bus import Bus
from shared.config import Settings
from shared.consume import Consumer, decoder_for
from shared.kv import TypedBucket
from shared.policy import PolicyView
from shared.runtime import micro_service
from shared.streams import consumer_config

NAME = "executor"
_query = msgspec.json.Decoder(TaskStatusQuery)


async def run(settings: Settings, stop: anyio.Event) -> None:
    async with Bus.connect(settings, NAME) as bus:
        policy_kv, breaker_kv = await bus.policy_bucket(), await bus.bucket(s.KV_BREAKERS)
        policy, breakers = await PolicyView.load(policy_kv), BreakerView()
        executor = Executor(policy, TypedBucket(await bus.bucket(s.KV_TASKS), TaskRecord, lambda: None),
                            breakers, bus.emit)

        async def task_status(data: bytes) -> bytes:
            query = _query.decode(data)
            record = await executor.task_status(query.task_id)
            if record is None:
                return msgspec.json.encode(TaskStatusReply(task_id=query.task_id, found=False))
            return msgspec.json.encode(TaskStatusReply(
                task_id=query.task_id, found=True, status=record.status, agent=record.task.spec.agent,
                attempt=record.attempt, attempts=record.attempts, usage=record.usage))

        consumers = [
            Consumer(bus, s.STREAM_TASKS, consumer_config(settings, s.CONSUMER_EXECUTOR_TASKS, s.ALL_ADMITTED),
                     decoder_for(TaskAdmitted), executor.on_admitted),
            Consumer(bus, s.STREAM_STEPS,
                     consumer_config(settings, s.CONSUMER_EXECUTOR_STEPS, s.ALL_STEP_COMPLETED, s.ALL_STEP_FAILED),
                     decoder_for(Union[StepCompleted, StepFailed]), executor.on_step, long_running=True),
        ]
        endpoints = {"task": (s.EXECUTOR_TASK, task_status)}
        async with micro_service(bus, "runs admitted tasks on agent workers", endpoints), \
                anyio.create_task_group() as tg:
            tg.start_soon(policy.follow, policy_kv, stop)
            tg.start_soon(breakers.follow, breaker_kv, stop)
            for consumer in consumers:
                tg.start_soon(consumer.run, stop)
