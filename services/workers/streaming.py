"""An answer's text as it streams in, published as `streaming` progress: throttled, never waited on.

Providers hand over each piece of text as it arrives (`feed`, synchronous, cheap); `pump` publishes the
first piece at once (a follower's time to first token), then what has gathered at most every `interval_s`,
or as soon as `max_chars` have gathered, each with a sequence number so a follower can put them in order. Progress goes out without waiting for the stream's ack: a lost
piece costs a follower some text, never the task its answer (StepCompleted carries it whole).
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable

import anyio

from contracts import StepRequested, TaskProgress, subjects
from contracts.events import MAX_MESSAGE_CHARS

Notify = Callable[[str, TaskProgress], Awaitable[None]]
STAGE = "streaming"


class DeltaPublisher:
    def __init__(self, step: StepRequested, worker_id: str, notify: Notify, *, interval_s: float = 0.1,
                 max_chars: int = 400, clock: Callable[[], float] = time.perf_counter) -> None:
        self.step = step
        self.worker_id = worker_id
        self.notify = notify
        self.interval_s = interval_s
        self.max_chars = max_chars
        self.clock = clock
        self.started = clock()
        self.first_at: float | None = None
        """perf_counter seconds of the first piece (for time to first token)."""
        self.pieces: list[str] = []
        self.size = 0
        self.seq = 0
        self.flushed_at = -math.inf
        self._arrived = anyio.Event()

    def feed(self, text: str) -> None:
        if not text:
            return
        if self.first_at is None:
            self.first_at = self.clock()
        self.pieces.append(text)
        self.size += len(text)
        self._arrived.set()

    def first_token_ms(self) -> float | None:
        return None if self.first_at is None else (self.first_at - self.started) * 1000

    async def pump(self) -> None:
        """Publish pieces until cancelled (the step's end cancels it, then calls `flush`)."""
        while True:
            await self._arrived.wait()
            with anyio.move_on_after(self.flushed_at + self.interval_s - self.clock()):
                while self.size < self.max_chars:
                    self._arrived = anyio.Event()
                    await self._arrived.wait()
            await self.flush()

    async def flush(self) -> None:
        self._arrived = anyio.Event()
        self.flushed_at = self.clock()
        if not self.pieces:
            return
        text, self.pieces, self.size = "".join(self.pieces), [], 0
        step = self.step
        for start in range(0, len(text), MAX_MESSAGE_CHARS):  # a progress message is bounded
            self.seq += 1
            await self.notify(subjects.task_progress(step.tenant, step.task_id), TaskProgress(
                task_id=step.task_id, tenant=step.tenant, user=step.user, stage=STAGE, attempt=step.attempt,
                worker=self.worker_id, step_id=step.step_id, seq=self.seq,
                message=text[start:start + MAX_MESSAGE_CHARS]))
