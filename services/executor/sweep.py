"""The executor's timeout sweep: a step whose outcome is overdue is handled as a timeout.

Why a sweep, and why here. The worker enforces each attempt's timeout itself (the
step carries `timeout_s` and `deadline_at`; the call is cancelled there and reported
as a `timeout` StepFailed, which the breaker counts), so the usual case needs nothing
from the executor, and no consumer ever blocks waiting. What the worker cannot cover
is a step no worker reports on at all: none running for that agent kind, or each one
that took it killed (JetStream redelivers after ack_wait, and the next worker reports
the passed deadline). So every executor replica keeps a small index of running
tasks' step deadlines, fed by a watch of the executor's own `corral_tasks` bucket,
and handles a step still unanswered `grace_s` (ack_wait plus a margin) after its
deadline as that step's timeout. Replicas racing on one task are settled by the
record's compare-and-set; the index holds three fields per running task, not the
records themselves.

The sweep also wakes tasks whose ready subtasks wait for a slot of their tenant's (a record marked
`throttled`): each round, each such task tries to start them again (one decision, compare-and-set as any).

A record that does not decode is quarantined by the watch (shared/watch.py) and its
entry stays as its last good revision left it. It is the step's outcome that ends such
a task (the handler fails it, services/executor/handlers.py); a timeout finds no record
it can read, and leaves it at the dead letter.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import anyio
import msgspec

OnOverdue = Callable[[str, str, float], Awaitable[None]]
"""(the task's record key, step id, grace seconds)."""
OnThrottled = Callable[[str], Awaitable[None]]
"""(the task's record key): its ready subtasks wait for a slot of their tenant's."""
SWEEP_EVERY_S = 0.5
log = logging.getLogger(__name__)


class _DueSubtask(msgspec.Struct):
    status: str = "waiting"
    step_id: str = ""
    step_deadline: float = 0.0


class _Due(msgspec.Struct):
    """The fields of a TaskRecord the sweep reads (the rest is skipped while decoding)."""

    status: str = "running"
    step_id: str = ""
    step_deadline: float = 0.0
    phase: str = "single"
    subtasks: list[_DueSubtask] = []
    throttled: bool = False

    def steps(self) -> list[tuple[str, float]]:
        """(step id, deadline) of every step the task waits for: its own, or its running subtasks'."""
        if self.status != "running":
            return []
        if self.phase == "board":
            return []
        if self.phase == "subtasks":
            return [(s.step_id, s.step_deadline) for s in self.subtasks if s.status == "running" and s.step_deadline]
        return [(self.step_id, self.step_deadline)] if self.step_id and self.step_deadline else []


_decode = msgspec.json.Decoder(_Due).decode


class TimeoutSweep:
    def __init__(self, on_overdue: OnOverdue, grace_s: float, clock: Callable[[], float] = time.time,
                 on_throttled: OnThrottled | None = None) -> None:
        self.on_overdue = on_overdue
        self.on_throttled = on_throttled
        self.throttled: set[str] = set()
        """Record keys of running tasks whose ready subtasks wait for a tenant slot: tried again each round."""
        self.grace_s = grace_s
        self.clock = clock
        self.due: dict[str, dict[str, float]] = {}
        """record key (the task's ref) -> step id -> unix seconds from which it is overdue."""
        self.fired = 0

    def apply(self, key: str, value: bytes | None, revision: int = 0) -> None:
        due = _decode(value) if value is not None else None
        if due is not None and due.throttled and due.status == "running":
            self.throttled.add(key)
        else:
            self.throttled.discard(key)
        steps = due.steps() if due is not None else []
        if steps:
            self.due[key] = {step: deadline + self.grace_s for step, deadline in steps}
        else:
            self.due.pop(key, None)

    async def run(self, stop: anyio.Event) -> None:
        while not stop.is_set():
            now = self.clock()
            for key, steps in list(self.due.items()):
                for step, overdue_at in list(steps.items()):
                    if overdue_at > now or self.due.get(key, {}).get(step) != overdue_at:
                        continue
                    del self.due[key][step]  # the record's next change puts it back if it still runs
                    self.fired += 1
                    try:
                        await self.on_overdue(key, step, self.grace_s)
                    except Exception:  # counted and logged; the task is looked at again next round
                        log.exception("timeout sweep failed for task %s; retrying", key)
                        self.due.setdefault(key, {}).setdefault(step, now + SWEEP_EVERY_S)
            await self._retry_throttled()
            with anyio.move_on_after(SWEEP_EVERY_S):
                await stop.wait()

    async def _retry_throttled(self) -> None:
        for key in list(self.throttled) if self.on_throttled else []:
            try:
                await self.on_throttled(key)
            except Exception:  # logged; the next round tries again
                log.exception("starting the waiting subtasks of task %s failed; retrying", key)
