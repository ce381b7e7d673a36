"""Which `run()` a service name starts."""

from __future__ import annotations

import re
from functools import partial

from services.approvals import service as approvals
from services.breaker import service as breaker
from services.budget import service as budget
from services.executor import service as executor
from services.guard import service as guard
from services.monitor import service as monitor
from services.workers import service as workers
from shared.errors import CorralError
from shared.runtime import Main

SERVICES: dict[str, Main] = {
    "guard": guard.run,
    "budget": budget.run,
    "executor": executor.run,
    "breaker": breaker.run,
    "monitor": monitor.run,
    "approvals": approvals.run,
}


_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class UnknownService(CorralError):
    """No such service name."""


def resolve(name: str, agent: str | None = None) -> tuple[str, Main]:
    """(process label, main) for `corral service NAME [--agent KIND]`."""
    if name == "worker":
        if not agent or not _TOKEN.match(agent):
            raise UnknownService("`worker` needs --agent KIND: a name of letters, digits, - or _ (e.g. research)")
        return workers.name(agent), partial(workers.run, agent=agent)
    if name not in SERVICES:
        raise UnknownService(f"no service {name!r}; choose one of: {', '.join([*SERVICES, 'worker'])}")
    return name, SERVICES[name]
