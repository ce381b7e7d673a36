"""`corral submit` and `corral status`: send a task and follow it; read the monitor's metrics or one task."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import msgspec
import typer
from rich.console import Console
from rich.table import Table

from contracts import TaskSpec
from contracts.events import Plan
from services.cli.common import (ConfigOption, NatsOption, TaskTenantOption, call, console, resolve_settings,
                                 run)
from services.cli.follow import ProgressPrinter

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
    out.print(table)


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
