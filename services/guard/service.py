"""guard service: TaskSubmitted in, TaskValidated or TaskRejected out."""

from __future__ import annotations

from functools import partial

import anyio

from contracts import subjects as s
from services.guard.handlers import decode_submission, handle_submission
from shared.bus import Bus
from shared.config import Settings
from shared.consume import Consumer
from shared.policy import PolicyView
from shared.runtime import micro_service
from shared.streams import consumer_config

NAME = "guard"


async def run(settings: Settings, stop: anyio.Event) -> None:
    async with Bus.connect(settings, NAME) as bus, micro_service(bus, "validates and estimates submitted tasks"):
        policy_kv = await bus.policy_bucket()
        policy = await PolicyView.load(policy_kv)
        submissions = Consumer(
            bus,
            s.STREAM_TASKS,
            consumer_config(settings, s.CONSUMER_GUARD, s.ALL_SUBMITTED),
            partial(decode_submission, max_payload_bytes=settings.max_payload_bytes),
            partial(handle_submission, policy=policy, emit=bus.emit),
        )
        async with anyio.create_task_group() as tg:
            tg.start_soon(policy.follow, policy_kv, stop)
            await submissions.run(stop)
            tg.cancel_scope.cancel()
