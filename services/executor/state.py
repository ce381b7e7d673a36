"""The executor's record of each task, in the `corral_tasks` bucket it alone writes."""

from __future__ import annotations

from typing import Literal

import msgspec

from contracts import Attempt, TaskAdmitted, Usage

TaskStatus = Literal["running", "completed", "failed"]


class TaskRecord(msgspec.Struct, kw_only=True):
    task: TaskAdmitted
    """The admitted task, kept to issue its next attempt."""
    status: TaskStatus = "running"
    attempt: int = 1
    attempts: list[Attempt] = []
    usage: Usage | None = None
    admitted_at: float = 0.0


def step_id(task_id: str, attempt: int) -> str:
    return f"{task_id}-a{attempt}"

