"""Orchestration benchmark: `python -m tests.bench.orchestration`. It reports; it never asserts.

Every service runs as its own OS process on an embedded nats-server at 127.0.0.1, with
--replicas worker processes per agent kind (each takes up to `concurrency`, 64, steps at
once, so no step waits for a worker) and the SIMULATED model at --latency seconds per call
(it calls no real model). The workload decomposes: three independent parts (facts by
research, code by coding, notes by writing), then a synthesis (writing) over their results.

1. Makespan of --tasks such tasks, all submitted at once, done two ways, alternated over
   --rounds:
   - single agent: each task as four single-agent tasks one after another, the three parts
     and then the synthesis (given the parts' outputs), each part on the agent kind the plan
     names. Every model call is the same as in the plan, only the coordination differs.
     One task asking one agent for the whole would be one simulated call of the same
     second, where a real model would write four parts' worth of text: it would not be
     the same work.
   - centralized: one orchestrated task each, with the plan; the executor starts the three
     parts at once and the synthesis once they have answered.
   Reported: makespan (first submission to the last end heard), tasks per second and their
   ratio; and the parts alone (to the last part's StepCompleted): the synthesis runs after
   the parts either way, so it bounds the whole task's gain below the parts' threefold.
2. Handoff latency: from a step's StepCompleted (`occurred_at`: the worker has its result)
   to the StepRequested of the step it made ready (`occurred_at`: the executor asks for it).
   --chains tasks whose plan has a chain (code needs facts; notes needs nothing), submitted
   every --gap seconds, give subtask -> subtask and last subtask -> synthesis handoffs; the
   makespan runs' plans, all submitted at once, give last subtask -> synthesis in a burst.
   Each handoff is split at the plan progress the executor publishes once it has recorded
   its decision (it waits for that publish before it asks for the step).

   - distributed: the same plan on the task's board; the pools claim the parts and the synthesis.
   - hybrid: the same plan on the board; the pools claim the parts, the executor supervises and runs the
     synthesis.
3. Start latency, every mode alike: from a part's StepCompleted to the worker starting the step it made
   ready (that step's StepCompleted `occurred_at` less its `latency_ms`), for the chained plans run in each
   mode (the board modes publish no StepRequested: their pools claim from the board).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import anyio
import msgspec
from rich.console import Console
from rich.table import Table

from contracts import (
    StepCompleted,
    StepFailed,
    StepRequested,
    TaskCompleted,
    TaskFailed,
    TaskProgress,
    TaskRejected,
    TaskSpec,
)
from contracts.events import Plan, Subtask
from services.client import Client
from services.monitor.handlers import percentiles
from services.stack import CORE_SERVICES, Services, nats_server
from shared.config import Settings
from shared.policy import apply_policy
from tests.bench.common import ISOLATED_ENV
from tests.signals import Signals, example_policy, signals

TENANT = "acme"
USERS = 50  # budgets and rate limits are per user: spread the load as real traffic would
SYNTHESIS = "writing"
SYNTHESIS_TOKENS = 512  # the policy's orchestration.synthesis_output_tokens (its default)
PARTS = [Subtask(id="facts", agent="research", instruction="Gather the facts."),
         Subtask(id="code", agent="coding", instruction="Write the migration script."),
         Subtask(id="notes", agent="writing", instruction="Draft the release notes.")]
CHAIN = [PARTS[0], Subtask(id="code", agent="coding", instruction="Write the migration script from the facts.",
                           needs=["facts"]), PARTS[2]]
SINGLE, CENTRALIZED, DISTRIBUTED, HYBRID = "single agent", "centralized", "distributed", "hybrid"
ORCHESTRATED = (CENTRALIZED, DISTRIBUTED, HYBRID)
WAYS = (SINGLE, *ORCHESTRATED)
END_TIMEOUT_S = 120.0
TERMINAL = (TaskCompleted, TaskFailed, TaskRejected)


class Run(msgspec.Struct):
    """N tasks done one way: when the last ended, and how long the steps waited for a worker."""

    way: str
    round: int
    tasks: int
    completed: int
    makespan_s: float
    parts_s: float
    """First submission to the last part's StepCompleted."""
    per_s: float
    asked_again: int
    """Corral tasks of the run that had a step asked for again (a retry, or the timeout sweep's after no outcome
    came): each is a step of the model's latency, or the sweep's wait, added to the makespan."""
    step_overhead_p50_ms: float
    step_overhead_p99_ms: float
    """A step's StepRequested to its StepCompleted, minus the model call: waiting for a worker, and its loop."""


class Handoff(msgspec.Struct):
    kind: str
    total_ms: float
    recorded_ms: float | None
    """StepCompleted to the plan progress the executor publishes once its decision is recorded."""
    published_ms: float | None
    """That progress to the StepRequested (the executor waits for the progress's publish)."""
    heard_ms: float | None
    """The StepRequested's `occurred_at` to a subscriber hearing it (the step's own publish)."""


class Spread(msgspec.Struct):
    count: int
    p50_ms: float
    p99_ms: float


class StartSummary(msgspec.Struct):
    """A part's result -> the worker starting the step it made ready, in one mode."""

    way: str
    kind: str
    spread: Spread


class HandoffSummary(msgspec.Struct):
    kind: str
    source: str
    total: Spread
    recorded: Spread
    published: Spread
    heard: Spread


class Report(msgspec.Struct):
    latency_s: float
    tasks: int
    replicas: int
    executors: int
    runs: list[Run]
    ratio_per_round: dict[str, list[float]]
    """Each orchestrated way's throughput over the single agent's, by way, per round."""
    ratio_median: dict[str, float]
    parts_ratio_median: dict[str, float]
    handoffs: list[HandoffSummary]
    starts: list[StartSummary]
    incomplete: int
    """Orchestrated tasks left out of the handoffs: they did not complete, or a step of theirs ran twice."""
    step_failures: dict[str, int]
    """StepFailed events heard in the measured runs, by error."""
    asked_again: list[str]
    """Why steps were asked for again in the measured runs (the executor's retry progress), each once."""
    cores: int
    load_average: list[list[float]]
    """os.getloadavg() before and after the measured runs."""
    elapsed_s: float


class Heard:
    """Every task event heard while `follow` runs: the plan progress by the step that caused it, and each end,
    handed to whoever waits for it, with the time it was heard."""

    def __init__(self) -> None:
        self.ends: dict[str, tuple[float, object]] = {}
        self.plan_progress: dict[str, TaskProgress] = {}
        self.asked_again: dict[str, list[TaskProgress]] = {}
        """Task id -> its retry and fallback progress: a step asked for again."""
        self._waiting: dict[str, anyio.Event] = {}

    async def follow(self, events) -> None:
        async for event in events:
            if isinstance(event, TaskProgress):
                if event.stage == "plan" and event.step_id:
                    self.plan_progress.setdefault(event.step_id, event)
                elif event.stage in ("retrying", "fallback"):
                    self.asked_again.setdefault(event.task_id, []).append(event)
            elif isinstance(event, TERMINAL):
                self.ends[event.task_id] = (time.time(), event)
                if (waiting := self._waiting.pop(event.task_id, None)) is not None:
                    waiting.set()

    async def end_of(self, task_id: str) -> tuple[float, object]:
        if task_id not in self.ends:
            waiting = self._waiting.setdefault(task_id, anyio.Event())
            with anyio.fail_after(END_TIMEOUT_S):
                await waiting.wait()
        return self.ends[task_id]


class Work(msgspec.Struct):
    """One task of the workload, as it was done: the Corral tasks it took, and when its last one ended."""

    way: str
    parts: list[str]
    """Task ids whose steps are the parts (centralized: the one task, whose subtask steps they are)."""
    tasks: list[str]
    ended_at: float
    completed: bool


def part_prompt(request: str, part: Subtask) -> str:
    """What the executor tells a subtask's agent (services.executor.plans.subtask_prompt), for a part without
    needs."""
    return f"Overall request: {request}\n\nYour part ({part.id}): {part.instruction}"


def synthesis_prompt(request: str, outputs: Iterable[tuple[Subtask, str]]) -> str:
    """What the executor tells the synthesis (services.executor.plans.synthesis_prompt)."""
    results = [f"Result of {part.id} ({part.agent}):\n{output}" for part, output in outputs]
    return "\n\n".join([f"Request: {request}", "Put these results together into one answer.", *results])


async def single_agent(client: Client, heard: Heard, request: str, user: str) -> Work:
    """The three parts, then the synthesis over their outputs: four tasks, each submitted once the one before
    has ended."""
    ids, outputs = [], []
    for part in PARTS:
        task_id = await client.submit(TaskSpec(agent=part.agent, prompt=part_prompt(request, part)), tenant=TENANT,
                                      user=user)
        ids.append(task_id)
        ended_at, end = await heard.end_of(task_id)
        if not isinstance(end, TaskCompleted):
            return Work(way=SINGLE, parts=ids, tasks=ids, ended_at=ended_at, completed=False)
        outputs.append((part, end.output))
    spec = TaskSpec(agent=SYNTHESIS, prompt=synthesis_prompt(request, outputs), max_tokens=SYNTHESIS_TOKENS)
    task_id = await client.submit(spec, tenant=TENANT, user=user)
    ended_at, end = await heard.end_of(task_id)
    return Work(way=SINGLE, parts=ids, tasks=[*ids, task_id], ended_at=ended_at,
                completed=isinstance(end, TaskCompleted))


async def orchestrated(client: Client, heard: Heard, request: str, user: str, subtasks: list[Subtask],
                       way: str = CENTRALIZED) -> Work:
    spec = TaskSpec(agent=SYNTHESIS, prompt=request, orchestration=way, plan=Plan(subtasks=subtasks))
    task_id = await client.submit(spec, tenant=TENANT, user=user)
    ended_at, end = await heard.end_of(task_id)
    return Work(way=way, parts=[task_id], tasks=[task_id], ended_at=ended_at,
                completed=isinstance(end, TaskCompleted))


async def makespan(client: Client, heard: Heard, steps: Signals, way: str, tasks: int, round_: int,
                   ) -> tuple[Run, list[str]]:
    """`tasks` tasks submitted at once, done `way`; with the ids of the orchestrated tasks."""
    done: list[Work] = []

    async def one(n: int) -> None:
        request = f"Ship the migration (round {round_}, task {n})."
        user = f"bench{n % USERS}"
        done.append(await (single_agent(client, heard, request, user) if way == SINGLE else
                           orchestrated(client, heard, request, user, PARTS, way)))

    started = time.time()
    async with anyio.create_task_group() as tg:
        for n in range(tasks):
            tg.start_soon(one, n)
    last_end = max(work.ended_at for work in done)
    parts_done = max((_parts_done(steps, work) for work in done), default=started)
    overhead = percentiles(_step_overheads(steps, {task for work in done for task in work.tasks}))
    run = Run(way=way, round=round_, tasks=tasks, completed=sum(work.completed for work in done),
              makespan_s=round(last_end - started, 3), parts_s=round(parts_done - started, 3),
              per_s=round(tasks / (last_end - started), 3),
              asked_again=sum(task in heard.asked_again for work in done for task in work.tasks),
              step_overhead_p50_ms=round(overhead.p50_ms, 1),
              step_overhead_p99_ms=round(overhead.p99_ms, 1))
    return run, [work.tasks[0] for work in done if way == CENTRALIZED]  # the handoffs' breakdown: centralized


def _parts_done(steps: Signals, work: Work) -> float:
    """When the last of the work's parts had its result (its StepCompleted)."""
    return max((c.occurred_at.timestamp() for task in work.parts for c in steps.of(StepCompleted, task_id=task)
                if work.way == SINGLE or part_of_step(c.step_id, task) != "synthesis"), default=work.ended_at)


def part_of_step(step_id: str, task_id: str) -> str:
    """The part a step of an orchestrated task ran: `<tenant>/<task>-<part>-s0a1` (the executor's; its synthesis
    is `=synthesis`) or `<tenant>/<task>-<part>-c1s0a1` (a pool member's claim; its synthesis is `synthesis`)."""
    part = step_id.split(f"{task_id}-", 1)[1].rsplit("-", 1)[0]
    return "synthesis" if part == "=synthesis" else part


def _step_overheads(steps: Signals, tasks: set[str]) -> list[float]:
    requested = {e.step_id: e for _, e in steps.events if isinstance(e, StepRequested) and e.task_id in tasks}
    overheads = []
    for _, done in steps.events:
        if isinstance(done, StepCompleted) and (asked := requested.get(done.step_id)) is not None:
            model_ms = sum(call.latency_ms for call in done.calls) if done.calls else done.latency_ms
            overheads.append((done.occurred_at - asked.occurred_at).total_seconds() * 1000 - model_ms)
    return overheads


async def chains(client: Client, heard: Heard, count: int, gap_s: float, way: str = CENTRALIZED) -> list[str]:
    """`count` tasks whose plan has a chain, one submitted every `gap_s`; their ids."""
    ids: list[str] = []

    async def one(n: int) -> None:
        work = await orchestrated(client, heard, f"Ship the migration ({way} chain {n}).", f"bench{n % USERS}",
                                  CHAIN, way)
        ids.append(work.tasks[0])

    async with anyio.create_task_group() as tg:
        for n in range(count):
            tg.start_soon(one, n)
            await anyio.sleep(gap_s)  # pacing the submissions, not a sync point
    return ids


def handoffs(steps: Signals, heard: Heard, task_id: str, plan: list[Subtask]) -> list[Handoff] | None:
    """Every handoff of one orchestrated task; None unless it completed with each step run once."""
    requested = steps.of(StepRequested, task_id=task_id)
    completed = {c.step_id: c for c in steps.of(StepCompleted, task_id=task_id)}
    by_subtask = {r.subtask: r for r in requested}
    end = heard.ends.get(task_id, (0.0, None))[1]
    if not isinstance(end, TaskCompleted) or len(by_subtask) != len(requested) or len(completed) != len(requested):
        return None
    heard_at = {e.step_id: at for at, e in steps.events if isinstance(e, StepRequested) and e.task_id == task_id}
    found = []
    for sub in plan:
        if sub.needs:
            cause = max((completed[by_subtask[need].step_id] for need in sub.needs), key=lambda c: c.occurred_at)
            found.append(_handoff("subtask -> subtask", cause, by_subtask[sub.id], heard, heard_at))
    last = max((completed[by_subtask[sub.id].step_id] for sub in plan), key=lambda c: c.occurred_at)
    found.append(_handoff("last subtask -> synthesis", last, by_subtask[""], heard, heard_at))
    return found


def _handoff(kind: str, cause: StepCompleted, next_step: StepRequested, heard: Heard,
             heard_at: dict[str, float]) -> Handoff:
    done, asked = cause.occurred_at.timestamp(), next_step.occurred_at.timestamp()
    progress = heard.plan_progress.get(cause.step_id)
    recorded = progress.occurred_at.timestamp() if progress else None
    on_bus = heard_at.get(next_step.step_id)
    return Handoff(kind=kind, total_ms=(asked - done) * 1000,
                   recorded_ms=None if recorded is None else (recorded - done) * 1000,
                   published_ms=None if recorded is None else (asked - recorded) * 1000,
                   heard_ms=None if on_bus is None else (on_bus - asked) * 1000)


def starts(steps: Signals, task_id: str, plan: list[Subtask]) -> list[tuple[str, float]] | None:
    """(kind, ms) of each start one task's results made ready: a part's StepCompleted to the worker starting the
    step of the part it made ready. None unless the task completed with each part run once."""
    done: dict[str, StepCompleted] = {}
    for step in steps.of(StepCompleted, task_id=task_id):
        if part_of_step(step.step_id, task_id) in done:
            return None
        done[part_of_step(step.step_id, task_id)] = step
    if set(done) != {*(sub.id for sub in plan), "synthesis"}:
        return None

    def start(part: str) -> float:
        return done[part].occurred_at.timestamp() - done[part].latency_ms / 1000

    found = []
    for sub in plan:
        if sub.needs:
            cause = max((done[need] for need in sub.needs), key=lambda c: c.occurred_at)
            found.append(("subtask -> subtask", (start(sub.id) - cause.occurred_at.timestamp()) * 1000))
    last = max((done[sub.id] for sub in plan), key=lambda c: c.occurred_at)
    found.append(("last subtask -> synthesis", (start("synthesis") - last.occurred_at.timestamp()) * 1000))
    return found


def spread(values: list[float | None]) -> Spread:
    p = percentiles([v for v in values if v is not None])
    return Spread(count=p.count, p50_ms=round(p.p50_ms, 2), p99_ms=round(p.p99_ms, 2))


def summarise(kind: str, source: str, found: list[Handoff]) -> HandoffSummary:
    mine = [h for h in found if h.kind == kind]
    return HandoffSummary(kind=kind, source=source, total=spread([h.total_ms for h in mine]),
                          recorded=spread([h.recorded_ms for h in mine]),
                          published=spread([h.published_ms for h in mine]), heard=spread([h.heard_ms for h in mine]))


async def measure(url: str, services: Services, args: argparse.Namespace) -> Report:
    async with Client.connect(Settings(nats_url=url), "bench") as client:
        await apply_policy(await client.bus.policy_bucket(), example_policy())
        await client.wait_ready(services.names(), timeout=60)
        await _every_replica(client, Counter(services.names()))
        heard = Heard()
        async with client.events() as events, signals(client) as steps, anyio.create_task_group() as tg:
            tg.start_soon(heard.follow, events)
            for way in WAYS:  # warm-up: not reported
                await makespan(client, heard, steps, way, 1, -1)
            load, warm, warm_retries = [list(os.getloadavg())], len(steps.events), set(heard.asked_again)
            runs, burst = [], []
            for round_ in range(args.rounds):
                for way in WAYS[round_ % len(WAYS):] + WAYS[:round_ % len(WAYS)]:  # each way first in turn
                    run, centralized = await makespan(client, heard, steps, way, args.tasks, round_)
                    runs.append(run)
                    burst += centralized
            chained = {way: await chains(client, heard, args.chains, args.gap, way) for way in ORCHESTRATED}
            load.append(list(os.getloadavg()))
            tg.cancel_scope.cancel()
    found_burst = [handoffs(steps, heard, task, PARTS) for task in burst]
    found_chain = [handoffs(steps, heard, task, CHAIN) for task in chained[CENTRALIZED]]
    incomplete = sum(found is None for found in [*found_burst, *found_chain])
    started = {way: [starts(steps, task, CHAIN) for task in ids] for way, ids in chained.items()}
    start_summaries = [StartSummary(way=way, kind=kind, spread=spread([ms for found in found_starts if found
                                                                       for k, ms in found if k == kind]))
                       for way, found_starts in started.items()
                       for kind in ("subtask -> subtask", "last subtask -> synthesis")]
    burst_h = [h for found in found_burst if found for h in found]
    chain_h = [h for found in found_chain if found for h in found]
    summaries = [summarise("subtask -> subtask", f"chain plans, one every {args.gap:g} s", chain_h),
                 summarise("last subtask -> synthesis", f"chain plans, one every {args.gap:g} s", chain_h),
                 summarise("last subtask -> synthesis", f"the makespan runs' plans, {args.tasks} at once", burst_h)]
    by_round = {(run.round, run.way): run for run in runs}
    ratios = {way: [by_round[(r, way)].per_s / by_round[(r, SINGLE)].per_s for r in range(args.rounds)]
              for way in ORCHESTRATED}
    parts = {way: [by_round[(r, SINGLE)].parts_s / by_round[(r, way)].parts_s for r in range(args.rounds)]
             for way in ORCHESTRATED}
    return Report(latency_s=args.latency, tasks=args.tasks, replicas=args.replicas, executors=args.executors,
                  runs=runs, ratio_per_round={way: [round(r, 3) for r in rs] for way, rs in ratios.items()},
                  ratio_median={way: round(statistics.median(rs), 3) for way, rs in ratios.items()},
                  parts_ratio_median={way: round(statistics.median(ps), 3) for way, ps in parts.items()},
                  handoffs=summaries, starts=start_summaries, incomplete=incomplete + sum(
                      found is None for found_starts in started.values() for found in found_starts),
                  cores=os.cpu_count() or 0,
                  step_failures=dict(Counter(e.error for _, e in steps.events[warm:] if isinstance(e, StepFailed))),
                  asked_again=sorted({_why(p.message) for task, found in heard.asked_again.items()
                                      if task not in warm_retries for p in found}),
                  load_average=[[round(x, 2) for x in sample] for sample in load], elapsed_s=0.0)


def _why(message: str) -> str:
    """A retry progress message without its task's step ids and attempt numbers: one line per kind of cause."""
    return message.split("; ")[0]


async def _every_replica(client: Client, wanted: Counter[str], timeout: float = 60.0) -> None:
    with anyio.fail_after(timeout):
        while wanted - await client.running_services():
            pass  # each round already waited for answers


def print_report(report: Report, out: Console) -> None:
    title = (f"Orchestration: {report.tasks} tasks of three parts and a synthesis, all at once "
             f"(SIMULATED model, {report.latency_s:g} s per call)")
    table = Table(title=title)
    for column in ("way", "round", "completed", "makespan", "tasks/s", "parts alone", "steps asked again",
                   "step overhead p50 / p99"):
        table.add_column(column, justify="left" if column == "way" else "right")
    labels = {SINGLE: "single agent (4 tasks in turn)", CENTRALIZED: "centralized (1 task, plan)",
              DISTRIBUTED: "distributed (1 task, board)", HYBRID: "hybrid (1 task, board)"}
    for run in sorted(report.runs, key=lambda r: (WAYS.index(r.way), r.round)):
        overhead = (f"{run.step_overhead_p50_ms:.1f} / {run.step_overhead_p99_ms:.1f} ms"
                    if run.way in (SINGLE, CENTRALIZED) else "(no StepRequested)")
        table.add_row(labels[run.way], str(run.round + 1), f"{run.completed}/{run.tasks}", f"{run.makespan_s:.2f} s",
                      f"{run.per_s:.2f}", f"{run.parts_s:.2f} s",
                      f"[yellow]{run.asked_again}[/]" if run.asked_again else "0", overhead)
    out.print(table)
    for way in ORCHESTRATED:
        out.print(f"throughput {way} / single agent: {report.ratio_median[way]:.2f}x (median; rounds "
                  f"{', '.join(f'{r:.2f}' for r in report.ratio_per_round[way])}); the parts alone: "
                  f"{report.parts_ratio_median[way]:.2f}x")
    out.print("with no coordination cost: 2.00x for the whole task (four calls in turn against two: the parts at "
              "once, then the synthesis) and 3.00x for the parts alone; the claim to compare: 3x a single agent's "
              "throughput")
    table = Table(title="Handoffs: a step's StepCompleted -> the StepRequested it made ready (occurred_at)")
    for column in ("handoff", "of", "n", "total p50 / p99", "-> decision recorded", "-> step requested",
                   "(then heard on the bus)"):
        table.add_column(column, justify="left" if column in ("handoff", "of") else "right")
    for h in report.handoffs:
        table.add_row(h.kind, h.source, str(h.total.count), *(f"{s.p50_ms:.1f} / {s.p99_ms:.1f} ms"
                                                               for s in (h.total, h.recorded, h.published, h.heard)))
    out.print(table)
    table = Table(title="Start latency: a part's StepCompleted -> the worker starting the step it made ready")
    for column in ("way", "handoff", "n", "p50 / p99"):
        table.add_column(column, justify="right" if column in ("n", "p50 / p99") else "left")
    for s in report.starts:
        table.add_row(s.way, s.kind, str(s.spread.count), f"{s.spread.p50_ms:.1f} / {s.spread.p99_ms:.1f} ms")
    out.print(table)
    for why in report.asked_again:
        out.print(f"[yellow]a step was asked for again: {why}[/]")
    if report.step_failures:
        out.print(f"[yellow]steps failed: {report.step_failures}[/]")
    if report.incomplete:
        out.print(f"[yellow]{report.incomplete} orchestrated task(s) left out: not completed, or a step ran twice[/]")
    before, after = report.load_average
    out.print(f"{report.replicas} worker replicas per agent kind (each up to {Settings().concurrency} steps at once), "
              f"{report.executors} executor(s); {report.cores} cores; load average before "
              f"{before[0]:.2f}, after {after[0]:.2f}; wall time {report.elapsed_s:.0f} s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.orchestration", description=__doc__.splitlines()[0],
                                     epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=6, help="tasks per makespan run (default 6)")
    parser.add_argument("--rounds", type=int, default=3, help="makespan runs of each way, alternated (default 3)")
    parser.add_argument("--chains", type=int, default=20, help="tasks with a chained plan, for handoffs (default 20)")
    parser.add_argument("--gap", type=float, default=0.2, help="seconds between chained tasks (default 0.2)")
    parser.add_argument("--latency", type=float, default=1.0, help="simulated model, seconds per call (default 1)")
    parser.add_argument("--replicas", type=int, default=2, help="worker processes per agent kind (default 2)")
    parser.add_argument("--executors", type=int, default=1, help="executor processes (default 1)")
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    args = parser.parse_args(argv)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="corral-bench-orchestration-") as tmp:
        data_dir = Path(tmp)
        with nats_server(data_dir) as url:
            services = Services(url, data_dir / "logs", agents=(),
                                env={**ISOLATED_ENV, "CORRAL_SIM_LATENCY_S": str(args.latency),
                                     "CORRAL_SIM_FAILURE_RATE": "0"})
            for name in CORE_SERVICES:
                for _ in range(args.executors if name == "executor" else 1):
                    services.start_one(name)
            for agent in dict.fromkeys([*(part.agent for part in PARTS), SYNTHESIS]):
                for _ in range(args.replicas):
                    services.start_one("worker", agent=agent)
            try:
                report = anyio.run(measure, url, services, args, backend_options={"use_uvloop": True})
            finally:
                services.stop()
    report = msgspec.structs.replace(report, elapsed_s=round(time.monotonic() - started, 1))
    print_report(report, Console())
    if args.json:
        args.json.write_text(json.dumps(msgspec.to_builtins(report), indent=2))


if __name__ == "__main__":
    main()
