"""guard service: TaskSubmitted in, TaskValidated or TaskRejected out."""

from __future__ import annotations

from functools import partial

import anyio

from contracts import subjects as s
from services.guard.handlers import decode_submission, handle_submission
from shared.bus import Bus
from shared.config import Settings
from shared.consume import Consumer
from shared.runtime import micro_service
from shared.streams import consumer_config

NAME = "guard"


async def run(settings: Settings, stop: anyio.Event) -> None:
    async with Bus.connect(settings, NAME) as bus, micro_service(bus, "validates and estimates submitted tasks"):
        submissions = Consumer(
            bus,
            s.STREAM_TASKS,
            consumer_config(settings, s.CONSUMER_GUARD, s.ALL_SUBMITTED),
            partial(decode_submission, settings=settings),
            partial(handle_submission, settings=settings, emit=bus.emit),
        )
        await submissions.run(stop)
