"""Approvals benchmark: `python -m tests.bench.approvals [--tasks N]`. It reports; it never asserts.

Every service runs as its own OS process on an embedded nats-server at 127.0.0.1, with the SIMULATED model
(zero latency) and the (simulated) browser tool high-stakes. N tasks call it, one at a time; a reviewer (this
process, as the operator) approves each as soon as the approvals service has its record. Measured per task:
submission -> ApprovalRequested heard (the step up to the gate), ApprovalRequested -> the record there to decide
on, the decision's reply -> TaskCompleted heard (resume: the executor, a worker, the approved call, the model),
and, for comparison, submission -> TaskCompleted of the same task without a gate.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import anyio
import msgspec
from rich.console import Console
from rich.table import Table

from contracts import TaskCompleted, TaskSpec, subjects
from contracts.approvals import ApprovalRequested, DecideApproval, ShowApproval
from contracts.policy import ApprovalRules, ToolRules
from services.client import Client
from services.monitor.handlers import percentiles
from services.stack import Services, nats_server
from shared.config import Settings
from shared.policy import apply_policy
from tests.bench.breakers import ISOLATED_ENV
from tests.signals import example_policy

_requested = msgspec.json.Decoder(ApprovalRequested).decode


def bench_policy():
    policy = example_policy()
    defaults = msgspec.structs.replace(policy.defaults, tools=ToolRules(allowed=["search", "browser"],
                                                                        high_stakes=["browser"]),
                                       approvals=ApprovalRules(reviewers={"reviewers": ["operator"]}))
    return msgspec.structs.replace(policy, defaults=defaults)


async def measure(client: Client, tasks: int) -> dict[str, list[float]]:
    figures: dict[str, list[float]] = {"to the gate": [], "to the record": [], "decision to end": [],
                                       "ungated task": []}
    asked: dict[str, tuple[ApprovalRequested, float]] = {}
    gated: dict[str, anyio.Event] = {}

    async def heard(msg) -> None:
        request = _requested(msg.data)
        asked[request.task_id] = (request, time.perf_counter())
        gated.setdefault(request.task_id, anyio.Event()).set()

    sub = await client.bus.nc.subscribe(subjects.approval_requested("default"), cb=heard)
    try:
        for n in range(tasks):
            spec = TaskSpec(agent="research", prompt=f"Look up price page {n}", tools=["search", "browser"])
            async with client.events(ends_only=True) as ends:
                started = time.perf_counter()
                task_id = await client.submit(spec, tenant="default", user=f"bench{n}")
                with anyio.fail_after(60):
                    await gated.setdefault(task_id, anyio.Event()).wait()
                request, at = asked[task_id]
                figures["to the gate"].append((at - started) * 1000)
                show = ShowApproval(approval_id=request.approval_id)
                while not (await client.approval(show)).ok:
                    pass
                figures["to the record"].append((time.perf_counter() - at) * 1000)
                await client.decide_approval(DecideApproval(approval_id=request.approval_id, decision="approve"),
                                             reviewer="operator")
                decided = time.perf_counter()
                async for event in ends:
                    if event.task_id == task_id:
                        assert isinstance(event, TaskCompleted), event
                        figures["decision to end"].append((time.perf_counter() - decided) * 1000)
                        break
            plain = TaskSpec(agent="research", prompt=f"Look up price page {n}", tools=["search"])
            started = time.perf_counter()
            await client.run(plain, tenant="default", user=f"bench{n}")
            figures["ungated task"].append((time.perf_counter() - started) * 1000)
    finally:
        await sub.unsubscribe()
    return figures


async def main(tasks: int, data_dir: Path) -> None:
    with nats_server(data_dir) as url:
        stack = Services(url, data_dir / "logs", env={**ISOLATED_ENV, "CORRAL_SIM_LATENCY_S": "0"},
                         agents=("research",))
        stack.start()
        try:
            settings = Settings(nats_url=url, sim_latency_s=0.0)
            async with Client.connect(settings, "bench") as client:
                version = await apply_policy(await client.bus.policy_bucket(), bench_policy())
                await client.wait_ready(stack.names(), timeout=30)
                await client.wait_policy(version, stack.names())
                figures = await measure(client, tasks)
        finally:
            stack.stop()
    table = Table(title=f"Approvals: {tasks} gated tasks, one at a time, {os.cpu_count()} cores")
    for column in ("what", "p50 ms", "p95 ms", "max ms"):
        table.add_column(column, justify="left" if column == "what" else "right")
    for what, samples in figures.items():
        p = percentiles(samples)
        table.add_row(what, f"{p.p50_ms:.1f}", f"{p.p95_ms:.1f}", f"{max(samples):.1f}")
    Console().print(table)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        anyio.run(main, args.tasks, Path(tmp))
