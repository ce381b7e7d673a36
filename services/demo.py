"""The demo workload: hundreds of tasks from dozens of users, against the SIMULATED model.

The mix is deliberate, so the summary shows every path: most tasks complete;
some are rejected by the guard (unknown agent, oversized prompt, empty prompt,
one chatty user over its rate limit) or by the budget (a heavy user exhausts
its daily tokens); some fail
transiently and are retried (simulated failure rate, flaky prompts); a few fail
permanently.

The seed's default budget allows 1,000 tokens an hour, two or three tasks: on a
server where no policy was ever applied (the demo's own embedded one), the demo
applies the demo policy (`demo_policy`): an hour as large as the day, and rate limits with room for
a demo's bursts but for one chatty user.

Then one multi-agent task in each coordination mode: a plan of three parts (research, coding,
writing) and a synthesis, centralized (with the publisher's plan, and with the manager's),
distributed and hybrid; the summary shows how each ended.

Then a few gated tasks: initech's policy makes the (simulated) `browser` tool high-stakes, so each task stops
before its browser call and waits for a person. A scripted reviewer (the demo's operator identity) approves one
as asked, approves one with edited arguments, denies one and lets one wait out its deadline; the summary shows
how each ended.

Beside the simulated workload, a few tasks go to a real model: the `assistant` agent runs on
the `local` provider, the llama.cpp server the demo starts (SmolLM2-135M on this machine's
CPU). The summary shows them apart, named as the real model they are.

And one outage: once a fifth of the tasks have been submitted, the simulated advanced model
(`simulated/sim-large`) fails every call (`corral sim fail`, acknowledged by every worker
before the next task goes out) until its breaker opens (`corral sim recover`). Research and
coding tasks fall back to the fast tier, at once while the circuit is open; after the wait
(scaled to the demo's length by the demo's policy) a probe finds the model recovered and
closes the circuit. The summary counts the trips and recoveries. Both ends of the outage
follow events, not the clock or a count of ended tasks, which a busy machine shifts: the
tasks submitted after it began call a failing model, and once the workload is done the
demo sends research tasks of its own until the circuit has opened and closed again.
"""

from __future__ import annotations

import random
import time
from collections import Counter

import anyio
import msgspec
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from contracts import BreakerChanged, TaskCompleted, TaskFailed, TaskProgress, TaskRejected, TaskSpec, subjects
from contracts.approvals import ApprovalRequested, DecideApproval, ShowApproval
from contracts.events import Plan, Subtask
from contracts.commands import SimulateDependency
from contracts.policy import (
    DEFAULT_POLICY,
    AgentPolicy,
    ApprovalRules,
    BreakerSettings,
    BudgetLimits,
    Defaults,
    Policy,
    RateLimit,
    ResponseCache,
    TenantPolicy,
    ToolRules,
    UserPolicy,
)
from contracts.queries import StatusReport
from services.client import Client
from services.monitor.handlers import percentiles
from services.stack import LOCAL_MODEL, LOCAL_STRATEGY
from shared.config import Settings
from shared.policy import apply_policy, read_policy

TENANTS = ("acme", "globex", "initech")
AGENTS = ("research", "coding", "writing")
TOPICS = ("the quarterly churn numbers", "a retry policy for payments", "onboarding emails", "the incident on Tuesday",
          "GPU cost per request", "a migration to NATS", "the tenant billing model", "flaky integration tests")
TERMINAL_WAIT_S = 60.0
LOCAL_AGENT = "assistant"
"""The agent kind on the real local model."""
LOCAL_PROMPTS = ("In one sentence: what does a circuit breaker do in software?",
                 "Name two reasons to put a rate limit in front of an API.",
                 "In one sentence: why do AI agents need a token budget?")
LOCAL_WAIT_S = 120.0
ORCHESTRATED_WAIT_S = 60.0
DEMO_POLICY = Policy(
    description="corral demo: an hourly budget as large as the daily one, room for bursts, one chatty user",
    defaults=Defaults(rate=RateLimit(requests_per_minute=600, burst_requests=20, tokens_per_minute=200_000,
                                     burst_tokens=40_000),
                      tenant_rate=RateLimit(requests_per_minute=6_000, burst_requests=500,
                                            tokens_per_minute=2_000_000, burst_tokens=400_000),
                      budget=BudgetLimits(daily_tokens=10_000, hourly_tokens=10_000)),
    tenants={"default": TenantPolicy(), "acme": TenantPolicy(),
             # initech's browser calls need a person's approval (the demo's scripted reviewer is the operator)
             "initech": TenantPolicy(tools=ToolRules(allowed=["search", "browser"], high_stakes=["browser"]),
                                     approvals=ApprovalRules(reviewers={"reviewers": ["operator"]}, deadline_s=4.0)),
             # user01 (globex) sends a task in eleven: its tight rate limit shows rate_limited
             "globex": TenantPolicy(users={"user01": UserPolicy(rate=RateLimit(requests_per_minute=120,
                                                                               burst_requests=5))})},
    agents={**DEFAULT_POLICY.agents, LOCAL_AGENT: AgentPolicy(chain=[LOCAL_STRATEGY], default_output_tokens=48),
            # the writing agent keeps its answers: the workload's frequently asked questions come back from the
            # response cache (docs/caching.md), and the summary's savings line counts what that saved
            "writing": msgspec.structs.replace(DEFAULT_POLICY.agents["writing"], cache=ResponseCache(enabled=True))},
)
FREQUENT = ("Write the release note for version 2.", "Draft the welcome email for new users.",
            "Write a one-line status for the outage page.")
"""Asked again and again by many users of the workload: the response cache answers all but the first."""
OUTAGE = "simulated/sim-large"
SETTLE_S = 20.0
"""After the workload, how long the demo keeps sending research tasks for the outage's circuit to open and close
again (it stops as soon as it has closed: this bounds only a circuit that never does)."""
PROBE_EVERY_S = 0.5
OUTAGE_FROM = 0.2  # the share of the tasks submitted from which the advanced model fails


class Orchestrated(msgspec.Struct):
    mode: str
    planned_by: str
    outcome: str = "no answer"
    parts: int = 0
    tokens: int = 0
    latency_ms: float = 0.0


class Gated(msgspec.Struct):
    """A task whose browser call waits for approval, what the scripted reviewer does, and how it ended."""

    decision: str
    """approve, edit, deny or wait (let the deadline pass)."""
    approval_id: str = ""
    outcome: str = "no answer"
    error: str = ""


class LocalAnswer(msgspec.Struct):
    prompt: str
    outcome: str
    """`completed`, or why not (the rejection's or failure's reason)."""
    output: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    latency_ms: float = 0.0


class Summary(msgspec.Struct):
    submitted: int = 0
    completed: int = 0
    rejected: dict[str, int] = {}
    failed: dict[str, int] = {}
    retried_tasks: int = 0
    latencies_ms: list[float] = []
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    lost: int = 0
    elapsed_s: float = 0.0
    monitor: StatusReport | None = None
    fallbacks: int = 0
    """Tasks completed by a strategy after the first of their chain."""
    breaker_changes: dict[str, int] = {}
    """BreakerChanged events by `previous->state`."""
    outage: str = ""
    probe_tasks: int = 0
    """Research tasks sent after the workload so that a probe could close the circuit."""
    local: list[LocalAnswer] = []
    """The tasks answered (or not) by the real local model."""
    orchestrated: list[Orchestrated] = []
    """One multi-agent task per coordination mode."""
    gated: list[Gated] = []
    """The tasks that waited for approval."""


    @property
    def ended(self) -> int:
        return self.completed + sum(self.rejected.values()) + sum(self.failed.values())


def workload(tasks: int, users: int, seed: int = 7) -> list[tuple[str, str, TaskSpec]]:
    """(tenant, user, spec) for each task, reproducible from `seed`."""
    rng = random.Random(seed)
    people = [(TENANTS[i % len(TENANTS)], f"user{i:02d}") for i in range(users)]
    out = []
    for n in range(tasks):
        tenant, user = people[0] if n % 9 == 0 else people[1] if n % 11 == 0 else rng.choice(people)
        agent = rng.choice(AGENTS)
        prompt = f"Task {n}: {rng.choice(('Research', 'Draft', 'Review', 'Plan'))} {rng.choice(TOPICS)}."
        max_tokens = 1500 if user == "user00" else None  # a heavy user runs out of budget
        roll = rng.random()
        if roll < 0.03:
            agent = "painter"  # unknown agent kind: rejected by the guard
        elif roll < 0.05:
            prompt = "x" * 40_000  # over the prompt size limit
        elif roll < 0.06:
            prompt = "   "
        elif roll < 0.10:
            prompt += " [sim:flaky=1]"  # first attempt fails, the retry succeeds
        elif roll < 0.12:
            prompt += " [sim:fail=permanent]"
        elif roll < 0.22:
            agent, prompt = "writing", rng.choice(FREQUENT)
        out.append((tenant, user, TaskSpec(agent=agent, prompt=prompt, max_tokens=max_tokens)))
    return out


def demo_policy(tasks: int, rate: float) -> Policy:
    """DEMO_POLICY, with the outage's breaker waiting a fifth of the workload's length in open (not the
    default 60 s), so its recovery happens while tasks still arrive to probe it."""
    wait = max(0.3, 0.2 * tasks / rate)
    return msgspec.structs.replace(DEMO_POLICY, breaker_overrides={OUTAGE: BreakerSettings(wait_in_open_s=wait)})


async def run(settings: Settings, tasks: int, users: int, rate: float, services: list[str],
              local_model: bool = True) -> Summary:
    summary = Summary()
    plan = workload(tasks, users)
    pending: dict[str, float] = {}
    retried: set[str] = set()
    async with Client.connect(settings, "demo") as client, client.events(breakers=True) as events:
        policy_kv = await client.bus.policy_bucket()
        if (await read_policy(policy_kv))[0] == 0:  # never overrule an operator's policy
            await apply_policy(policy_kv, demo_policy(tasks, rate))
        await client.wait_ready(services)
        workers = sum(1 for name in services if name.startswith("corral-worker-"))
        started = time.perf_counter()
        with _progress() as progress:
            bar = progress.add_task("tasks", total=len(plan))  # one step per task that reached its end
            outage = Outage(client, workers)
            async with anyio.create_task_group() as tg:
                tg.start_soon(_publish, client, plan, rate, pending, summary, outage)
                with anyio.move_on_after(len(plan) / rate + TERMINAL_WAIT_S):
                    async for event in events:
                        if isinstance(event, TaskProgress) and event.stage == "retrying":
                            retried.add(event.task_id)
                        await outage.follow(event, summary)
                        if _record(event, pending, summary, settings):
                            progress.advance(bar)
                            if summary.ended == len(plan):
                                break
            await outage.settle(events, summary)
        summary.orchestrated = await _orchestrate(client)
        summary.gated = await _gated(client)
        if local_model:
            summary.local = await _ask_the_local_model(client)
        summary.monitor = await _monitor_status(client)
    summary.retried_tasks = len(retried)
    summary.lost = len(plan) - summary.ended + sum(answer.outcome == "no answer" for answer in summary.local) + \
        sum(task.outcome == "no answer" for task in summary.orchestrated) + \
        sum(task.outcome == "no answer" for task in summary.gated)
    summary.elapsed_s = time.perf_counter() - started
    return summary


class Outage:
    """Fail the advanced model when the publisher says; recover it when its breaker opens (however many tasks
    that takes); count every breaker change."""

    def __init__(self, client: Client, workers: int) -> None:
        self.client = client
        self.workers = workers
        self.state = "pending"
        self.circuit = "closed"
        self.began = 0

    async def begin(self, summary: Summary) -> None:
        """Make the model fail; returns once every worker has acknowledged it."""
        self.state, self.began = "failing", summary.submitted
        await self.client.simulate(SimulateDependency(dependency=OUTAGE, mode="fail"), expect=self.workers)

    async def follow(self, event, summary: Summary) -> None:
        """Count breaker changes; end the outage when its circuit opens."""
        if isinstance(event, BreakerChanged):
            change = f"{event.previous}->{event.state}"
            summary.breaker_changes[change] = summary.breaker_changes.get(change, 0) + 1
        if self.state == "failing" and isinstance(event, BreakerChanged) and event.dependency == OUTAGE \
                and event.state == "open":
            await self.recover(summary)
        if isinstance(event, BreakerChanged) and event.dependency == OUTAGE:
            self.circuit = event.state

    async def recover(self, summary: Summary) -> None:
        self.state = "recovered"
        await self.client.simulate(SimulateDependency(dependency=OUTAGE, mode="recover"), expect=self.workers)
        summary.outage = f"{OUTAGE}: from submission {self.began + 1} to end {summary.ended}"

    def over(self) -> bool:
        """The outage has run its course: the circuit opened, and closed again once the model was back."""
        return self.state == "recovered" and self.circuit == "closed"

    async def settle(self, events, summary: Summary) -> None:
        """After the last task, hear the outage's circuit open (if the workload's own calls did not trip it) and
        close again. Both need calls to the model, so while the outage is not over, send one research task each
        PROBE_EVERY_S (counted apart from the workload)."""
        if self.state == "pending":
            return
        with anyio.move_on_after(SETTLE_S):
            while not self.over():
                with anyio.move_on_after(PROBE_EVERY_S):
                    while not self.over():
                        await self.follow(await events.receive(), summary)
                if not self.over():
                    summary.probe_tasks += 1
                    await self.client.submit(TaskSpec(agent="research", prompt="Is the advanced model back?"),
                                             tenant=TENANTS[0], user="demo-prober")
        if self.state == "failing":  # the circuit never opened: leave the model working all the same
            await self.recover(summary)


async def _publish(client: Client, plan, rate: float, pending: dict[str, float], summary: Summary,
                   outage: Outage) -> None:
    start = time.perf_counter()
    for n, (tenant, user, spec) in enumerate(plan):
        if n == int(len(plan) * OUTAGE_FROM):
            await outage.begin(summary)
        delay = start + n / rate - time.perf_counter()
        if delay > 0:
            await anyio.sleep(delay)
        task_id = f"demo-{n:05d}-{random.getrandbits(32):08x}"
        pending[task_id] = time.perf_counter()
        await client.submit(spec, tenant=tenant, user=user, task_id=task_id)
        summary.submitted += 1


def _record(event, pending: dict[str, float], summary: Summary, settings: Settings) -> bool:
    if not isinstance(event, (TaskCompleted, TaskFailed, TaskRejected)) or event.task_id not in pending:
        return False
    summary.latencies_ms.append((time.perf_counter() - pending.pop(event.task_id)) * 1000)
    match event:
        case TaskCompleted():
            summary.completed += 1
            summary.fallbacks += event.strategy > 0
            summary.input_tokens += event.usage.input_tokens
            summary.output_tokens += event.usage.output_tokens
            summary.cost_usd += DEFAULT_POLICY.price_of(event.model).cost(event.usage)
        case TaskRejected():
            summary.rejected[event.reason] = summary.rejected.get(event.reason, 0) + 1
        case TaskFailed():
            summary.failed[event.reason] = summary.failed.get(event.reason, 0) + 1
    return True


PLAN = Plan(subtasks=[Subtask(id="facts", agent="research", instruction="Gather the facts."),
                      Subtask(id="script", agent="coding", instruction="Write the migration script.", needs=["facts"]),
                      Subtask(id="notes", agent="writing", instruction="Draft the release notes.")],
            synthesis="writing")
ORCHESTRATED = (("centralized", "the publisher"), ("centralized", "the manager"), ("distributed", "the publisher"),
                ("hybrid", "the publisher"))


async def _orchestrate(client: Client) -> list[Orchestrated]:
    """One multi-agent task per mode, all at once; how each ended."""
    tasks = [Orchestrated(mode=mode, planned_by=by) for mode, by in ORCHESTRATED]

    async def run_one(n: int, task: Orchestrated) -> None:
        started = time.perf_counter()
        spec = TaskSpec(agent="writing", prompt="Plan and ship the migration to NATS.", orchestration=task.mode,
                        plan=PLAN if task.planned_by == "the publisher" else None)
        end = await client.run(spec, tenant=TENANTS[1], user=f"demo-planner{n}", timeout=ORCHESTRATED_WAIT_S)
        task.latency_ms = (time.perf_counter() - started) * 1000
        task.outcome = "completed" if isinstance(end, TaskCompleted) else end.reason
        if isinstance(end, TaskCompleted):
            task.tokens = end.usage.total
            task.parts = end.attempts

    with anyio.move_on_after(ORCHESTRATED_WAIT_S):
        async with anyio.create_task_group() as tg:
            for n, task in enumerate(tasks):
                tg.start_soon(run_one, n, task)
    return tasks


GATED_TENANT = "initech"
DECISIONS = ("approve", "edit", "deny", "wait")
GATED_WAIT_S = 60.0


async def _gated(client: Client) -> list[Gated]:
    """One gated task per decision, all at once, decided by a scripted reviewer as each asks; how each ended."""
    tasks = [Gated(decision=decision) for decision in DECISIONS]
    by_task = {f"demo-gated-{n}-{random.getrandbits(32):08x}": task for n, task in enumerate(tasks)}
    decode = msgspec.json.Decoder(ApprovalRequested).decode

    async def review(msg) -> None:
        asked = decode(msg.data)
        task = by_task.get(asked.task_id)
        if task is None:
            return
        task.approval_id = asked.approval_id  # a retried step asks again: decided alike
        if task.decision == "wait":
            return
        arguments = '{"query": "the approved page"}' if task.decision == "edit" else None
        decision = DecideApproval(tenant=asked.tenant, approval_id=asked.approval_id, decision=task.decision,
                                  arguments=arguments, reason="scripted reviewer: not this one"
                                  if task.decision == "deny" else "scripted reviewer")
        shown = ShowApproval(tenant=asked.tenant, approval_id=asked.approval_id)
        while not (await client.approval(shown)).ok:  # heard before the approvals service has stored it
            await anyio.sleep(0.05)
        await client.decide_approval(decision, reviewer="operator")

    async def run_one(task_id: str, task: Gated) -> None:
        spec = TaskSpec(agent="research", prompt="Look up the vendor's price page.", tools=["search", "browser"])
        end = await client.run(spec, tenant=GATED_TENANT, user="demo-gated", task_id=task_id, timeout=GATED_WAIT_S)
        task.outcome = "completed" if isinstance(end, TaskCompleted) else getattr(end, "reason", "rejected")
        task.error = end.error if isinstance(end, TaskFailed) else getattr(end, "message", "")

    sub = await client.bus.nc.subscribe(subjects.approval_requested(GATED_TENANT), cb=review)
    try:
        with anyio.move_on_after(GATED_WAIT_S):
            async with anyio.create_task_group() as tg:
                for task_id, task in by_task.items():
                    tg.start_soon(run_one, task_id, task)
    finally:
        await sub.unsubscribe()
    return tasks


async def _ask_the_local_model(client: Client) -> list[LocalAnswer]:
    """Send LOCAL_PROMPTS to the agent on the real local model, at once; each one's outcome."""
    answers: list[LocalAnswer] = [LocalAnswer(prompt=prompt, outcome="no answer") for prompt in LOCAL_PROMPTS]

    async def ask(n: int) -> None:
        started = time.perf_counter()
        end = await client.run(TaskSpec(agent=LOCAL_AGENT, prompt=LOCAL_PROMPTS[n], max_tokens=48),
                               tenant=TENANTS[0], user="demo-local", timeout=LOCAL_WAIT_S)
        answer = answers[n]
        answer.latency_ms = (time.perf_counter() - started) * 1000
        if isinstance(end, TaskCompleted):
            answer.outcome, answer.output = "completed", end.output
            answer.input_tokens, answer.output_tokens = end.usage.input_tokens, end.usage.output_tokens
        else:
            answer.outcome = end.reason

    with anyio.move_on_after(LOCAL_WAIT_S):
        async with anyio.create_task_group() as tg:
            for n in range(len(LOCAL_PROMPTS)):
                tg.start_soon(ask, n)
    return answers


async def _monitor_status(client: Client) -> StatusReport | None:
    try:
        return await client.status(timeout=3.0)
    except Exception:
        return None


def _progress() -> Progress:
    return Progress(TextColumn("[bold]demo[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())


def print_summary(summary: Summary, console: Console) -> None:
    table = Table(title="Corral demo (SIMULATED model)")
    table.add_column("what")
    table.add_column("value", justify="right")
    lat = percentiles(summary.latencies_ms)
    table.add_row("submitted", str(summary.submitted))
    table.add_row("completed", str(summary.completed))
    table.add_row("  of which retried after a failure", str(summary.retried_tasks))
    table.add_row("  of which on a fallback strategy", str(summary.fallbacks))
    for reason, count in sorted(Counter(summary.rejected).items()):
        table.add_row(f"rejected: {reason}", str(count))
    for reason, count in sorted(Counter(summary.failed).items()):
        table.add_row(f"failed: {reason}", str(count))
    table.add_row("lost (no terminal event)", str(summary.lost))
    if summary.outage:
        table.add_row("simulated outage", summary.outage)
    changes = summary.breaker_changes
    table.add_row("breaker trips (closed -> open)", str(changes.get("closed->open", 0)))
    table.add_row("breaker probes failed (half_open -> open)", str(changes.get("half_open->open", 0)))
    table.add_row("breaker recoveries (half_open -> closed)", str(changes.get("half_open->closed", 0)))
    if summary.probe_tasks:
        table.add_row("  tasks sent after the workload to probe it", str(summary.probe_tasks))
    table.add_row("latency p50 / p95 (ms)", f"{lat.p50_ms:.0f} / {lat.p95_ms:.0f}")
    table.add_row("tokens in / out", f"{summary.input_tokens:,} / {summary.output_tokens:,}")
    table.add_row("cost (simulated prices)", f"${summary.cost_usd:.4f}")
    if summary.monitor:
        saved = summary.monitor.savings
        table.add_row("saved by the response cache", f"{sum(saved.hits.values())} hits, {saved.tokens_saved:,} tokens, "
                                                     f"${saved.cost_avoided_usd:.4f}")
    table.add_row("wall time", f"{summary.elapsed_s:.1f} s")
    if summary.monitor:
        table.add_row("monitor: tasks seen completed / failed",
                      f"{summary.monitor.counts.get('task.completed', 0)} / {summary.monitor.counts.get('task.failed', 0)}")
        table.add_row("monitor: step error rate", f"{summary.monitor.step_error_rate:.1%}")
    console.print(table)
    if summary.orchestrated:
        _print_orchestrated(summary.orchestrated, console)
    if summary.gated:
        _print_gated(summary.gated, console)
    if summary.local:
        _print_local(summary.local, console)


def _print_orchestrated(tasks: list[Orchestrated], console: Console) -> None:
    table = Table(title="Multi-agent tasks: three parts and a synthesis (SIMULATED model)")
    for column in ("mode", "plan by", "outcome", "steps", "tokens", "latency (ms)"):
        table.add_column(column, justify="left" if column in ("mode", "plan by", "outcome") else "right")
    for task in tasks:
        table.add_row(task.mode, task.planned_by, task.outcome, str(task.parts or "-"), f"{task.tokens:,}",
                      f"{task.latency_ms:.0f}")
    console.print(table)


def _print_gated(tasks: list[Gated], console: Console) -> None:
    table = Table(title="Gated tasks: a browser call waits for a scripted reviewer (SIMULATED model)")
    for column in ("reviewer", "outcome"):
        table.add_column(column, overflow="fold")
    for task in tasks:
        why = task.error.replace(f"approval {task.approval_id} ", "", 1) if task.error else ""
        table.add_row(task.decision if task.decision != "wait" else "(no decision)",
                      f"{task.outcome}: {why}" if why else task.outcome)
    console.print(table)


def _print_local(answers: list[LocalAnswer], console: Console) -> None:
    table = Table(title=f"Beside it: a REAL model, {LOCAL_MODEL} (SmolLM2-135M-Instruct) on llama.cpp, this CPU")
    for column in ("prompt", "outcome", "tokens in / out", "latency (ms)", "answer"):
        table.add_column(column, overflow="fold")
    for answer in answers:
        text = " ".join(answer.output.split())
        table.add_row(answer.prompt, answer.outcome, f"{answer.input_tokens} / {answer.output_tokens}",
                      f"{answer.latency_ms:.0f}", text if len(text) <= 160 else f"{text[:159]}…")
    console.print(table)
