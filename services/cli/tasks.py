"""`corral submit` and `corral status`: send a task and follow it; read the monitor's metrics or one task.

Following a task prints progress lines, an answer as it streams in, and, for an orchestrated task, its plan as
a tree of parts (planned / running / done / failed), redrawn in place on a terminal as the parts move, printed
anew on each change elsewhere (a pipe, a log)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import msgspec
import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.tree import Tree

from contracts import TaskSpec
from contracts.events import PartState, Plan
from services.cli.common import (ConfigOption, NatsOption, TaskTenantOption, call, console, resolve_settings,
                                 run)

if TYPE_CHECKING:
    from services.client import Client

app = typer.Typer()


@app.command()
def submit(
    prompt: Annotated[str, typer.Argument(help="what the agent should do")],
    agent: Annotated[str, typer.Option(help="agent kind")] = "research",
    user: Annotated[str, typer.Option(help="user the task runs for")] = "alice",
    tenant: Annotated[str, typer.Option(help="tenant of the user")] = "default",
    max_tokens: Annotated[Optional[int], typer.Option(help="cap on output tokens")] = None,
    tool: Annotated[Optional[list[str]], typer.Option(help="a tool the agent may call (repeat)")] = None,
    orchestration: Annotated[str, typer.Option(
        help="single (one agent), or centralized: subtasks of a plan, then a synthesis by AGENT")] = "single",
    plan: Annotated[Optional[Path], typer.Option(
        help="a JSON plan (the `plan` of contracts/schemas/task.submitted.v1.json) for --orchestration centralized; without one, AGENT plans")] = None,
    follow: Annotated[bool, typer.Option("--follow/--no-follow", help="wait and print progress until it ends")] = True,
    timeout: Annotated[float, typer.Option(help="seconds to wait with --follow")] = 60.0,
    nats: NatsOption = None,
    config: ConfigOption = None,
) -> None:
    """Submit one task (and by default follow it to its end)."""
    from services.client import Client
    from shared import tracing

    spec = TaskSpec(agent=agent, prompt=prompt, max_tokens=max_tokens, tools=tool or [],
                    orchestration=_mode(orchestration), plan=_read_plan(plan) if plan else None)
    settings = resolve_settings(nats, config)
    tracing.init_tracing("corral-cli", settings.otlp_endpoint)

    async def go() -> None:
        async with Client.connect(settings, "cli") as client:
            if not follow:
                console.print(await client.submit(spec, tenant=tenant, user=user))
                return
            printer = ProgressPrinter(console)
            end = await client.run(spec, tenant=tenant, user=user, timeout=timeout, on_progress=printer)
            printer.close(end)
            _print_terminal(end, streamed=printer.streamed)

    try:
        run(go)
    finally:
        tracing.shutdown_tracing()


@app.command()
def status(
    task_id: Annotated[Optional[str], typer.Argument(help="a task id; omit for the whole system")] = None,
    tenant: TaskTenantOption = "default",
    nats: NatsOption = None,
    config: ConfigOption = None,
) -> None:
    """Show the monitor's live metrics, or one task's state."""

    async def go(client: Client) -> None:
        if task_id:
            console.print_json(data=msgspec.to_builtins(await client.task_status(task_id, tenant=tenant)))
        else:
            print_status(await client.status(), console)

    call(nats, config, go)


def print_status(report, out: Console) -> None:
    from services.cli.common import scope_table
    from services.dashboard.samples import scope_lines

    table = Table(title="Corral status (from the monitor)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for kind, count in sorted(report.counts.items()):
        table.add_row(f"events {kind}", str(count))
    table.add_row("latency p50 / p95 / p99 (ms)",
                  f"{report.latency.p50_ms:.0f} / {report.latency.p95_ms:.0f} / {report.latency.p99_ms:.0f}")
    table.add_row("task error rate", f"{report.error_rate:.1%}")
    table.add_row("step error rate", f"{report.step_error_rate:.1%}")
    table.add_row("tokens, last hour", f"{report.tokens_last_hour:,}")
    table.add_row("cost (simulated prices)", f"${report.cost_usd:.4f} (${report.cost_per_task_usd:.5f}/task)")
    saved = report.savings
    if saved.hits:
        hits = ", ".join(f"{n} {source}" for source, n in sorted(saved.hits.items()))
        table.add_row("cache hits", f"{hits}: {saved.tokens_saved:,} tokens, ${saved.cost_avoided_usd:.4f} saved")
    if saved.compacted_steps:
        table.add_row("prompt compaction", f"{saved.compacted_steps} steps: {saved.tokens_before_compaction:,} -> "
                                           f"{saved.tokens_after_compaction:,} input tokens")
    for durable, depth in sorted(report.queue_depth.items()):
        table.add_row(f"queue {durable}", str(depth))
    for dep, state in sorted(report.breakers.items()):
        table.add_row(f"breaker {dep}", state)
    for times in report.breaker_times:
        if times.open_for_s:
            table.add_row(f"breaker {times.dependency} open for", f"{times.open_for_s:.0f} s")
    for scope in report.scopes[:1]:  # `all`: every scope's windows are in the reply (StatusReport.scopes)
        for window, figures in scope.windows.items():
            table.add_row(f"{window}: tasks, p95 (ms), errors, tokens/h",
                          f"{figures.tasks} / {figures.latency.p95_ms:.0f} / {figures.error_rate:.1%} / "
                          f"{figures.tokens_per_hour:,.0f}")
    out.print(table)
    out.print(scope_table(scope_lines(report.scopes), "Per scope (StatusReport.scopes)"))


def _mode(orchestration: str):
    if orchestration not in ("single", "centralized", "distributed", "hybrid"):
        raise typer.BadParameter(f"--orchestration is single, centralized, distributed or hybrid, not {orchestration!r}")
    return orchestration


def _read_plan(path: Path) -> Plan:
    try:
        return msgspec.json.decode(path.read_bytes(), type=Plan)
    except OSError as error:
        raise typer.BadParameter(f"cannot read the plan {path}: {error}") from None
    except (msgspec.DecodeError, msgspec.ValidationError) as error:
        raise typer.BadParameter(f"{path} is not a plan: {error}") from None


LOOK = {"waiting": ("planned", "dim"), "running": ("running", "yellow"), "completed": ("done", "green"),
        "failed": ("failed", "red"), "cancelled": ("cancelled", "dim")}


def plan_tree(task_id: str, parts: list[PartState]) -> Tree:
    """The task, its subtasks under it, and the synthesis last."""
    tree = Tree(f"plan of {task_id}", highlight=False)
    for part in parts:
        word, style = LOOK[part.status]
        used = f", {part.tokens:,} tokens" if part.tokens else ""
        tree.add(f"[{style}]{word:<9}[/] {part.id} ({part.agent}{used})")
    return tree


class ProgressPrinter:
    """Progress as lines; an answer streaming in as it is generated, its pieces in order (a retried step streams
    anew, on a line of its own); a plan's parts as a tree."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.step = ""
        self.streamed = ""
        """The text streamed by the last step that streamed."""
        self.pending: dict[int, str] = {}
        self.next_seq = 1
        self.live: Live | None = None
        self.parts: list[PartState] = []

    def __call__(self, progress) -> None:
        if progress.stage == "plan" and progress.parts:
            self._plan(progress.task_id, progress.parts)
            return
        self._stop_tree()
        if progress.stage != "streaming":
            self.end()
            self.console.print(f"  {progress.stage}: {progress.message}", markup=False, highlight=False)
            return
        if progress.step_id != self.step:
            self.end()
            self.step, self.streamed, self.pending, self.next_seq = progress.step_id, "", {}, 1
        self.pending[progress.seq] = progress.message
        while self.next_seq in self.pending:
            piece = self.pending.pop(self.next_seq)
            self.console.out(piece, end="", highlight=False)
            self.streamed += piece
            self.next_seq += 1

    def _plan(self, task_id: str, parts: list[PartState]) -> None:
        if parts == self.parts:
            return  # the same states again (another coordinator's news, a redelivery)
        self.parts = parts
        self.end()
        tree = plan_tree(task_id, parts)
        if not self.console.is_terminal:
            self.console.print(tree)
        elif self.live is None:
            self.live = Live(tree, console=self.console, auto_refresh=False)
            self.live.start(refresh=True)
        else:
            self.live.update(tree, refresh=True)

    def _stop_tree(self) -> None:
        """Leave the tree as it last was, above what comes next (the synthesis's answer streaming in)."""
        if self.live is not None:
            self.live.stop()
            self.live = None

    def end(self) -> None:
        if self.step:
            self.console.out("")
            self.step = ""

    def close(self, end=None) -> None:
        """The task ended (`end`, its terminal event): a plan's tree shows its synthesis as it ended."""
        if self.parts and end is not None and self.parts[-1].status not in ("completed", "failed"):
            status = "completed" if type(end).__struct_config__.tag == "task.completed" else "failed"
            self._plan(end.task_id, [*self.parts[:-1], msgspec.structs.replace(self.parts[-1], status=status)])
        self._stop_tree()
        self.end()


def _print_terminal(event, *, streamed: str = "") -> None:
    kind = type(event).__struct_config__.tag
    if kind == "task.completed":
        console.print(f"[green]completed[/] {event.task_id} in {event.attempts} attempt(s), "
                      f"{event.usage.input_tokens}+{event.usage.output_tokens} tokens"
                      f"{' (estimated)' if event.usage.estimated else ''}")
        if event.output != streamed:  # already printed as it streamed in
            console.print(event.output, markup=False, highlight=False)
    elif kind == "task.rejected":
        console.print(f"[yellow]rejected[/] ({event.reason}) ", end="")
        console.print(event.message, markup=False)
        raise typer.Exit(2)
    else:
        console.print(f"[red]failed[/] ({event.reason}) ", end="")
        console.print(event.error, markup=False)
        raise typer.Exit(1)
