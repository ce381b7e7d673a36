"""`corral budget show USER` and `corral cost TASK_ID`: ask the budget service (request/reply).

`app` is the `budget` group; `cost_app` holds `cost`, a command at the top level.

Nothing here reads the budget's bucket: the budget service owns it and answers.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import msgspec
import typer
from nats.errors import NoRespondersError
from rich.console import Console
from rich.table import Table

from contracts.queries import BudgetReply, CostReply
from services.budget.errors import BudgetUnavailable, UnknownTask
from services.cli.common import ConfigOption, NatsOption, TaskTenantOption, call, console

if TYPE_CHECKING:
    from services.client import Client

app = typer.Typer(help="Token budgets, as the budget service books them.", no_args_is_help=True)
cost_app = typer.Typer()
JsonOption = Annotated[bool, typer.Option("--json", help="print the reply as JSON")]


@app.command()
def show(
    user: Annotated[str, typer.Argument(help="the user")],
    tenant: Annotated[str, typer.Option(help="the user's tenant")] = "default",
    as_json: JsonOption = False,
    nats: NatsOption = None,
    config: ConfigOption = None,
) -> None:
    """A user's daily and hourly windows (and their tenant's): limit, used, reserved, remaining, reset time."""
    reply = _ask(nats, config, lambda client: client.budget(tenant, user))
    if as_json:
        console.print_json(msgspec.json.encode(reply).decode())
    else:
        print_budget(reply, console)


@cost_app.command()
def cost(
    task_id: Annotated[str, typer.Argument(help="the task")],
    tenant: TaskTenantOption = "default",
    as_json: JsonOption = False,
    nats: NatsOption = None,
    config: ConfigOption = None,
) -> None:
    """A task's tokens and cost, per step and per model (prices from the policy)."""

    async def ask(client: Client) -> CostReply:
        reply = await client.cost(task_id, tenant=tenant)
        if not reply.found:
            raise UnknownTask(f"the budget has no record of task {task_id!r}")
        return reply

    reply = _ask(nats, config, ask)
    if as_json:
        console.print_json(msgspec.json.encode(reply).decode())
    else:
        print_cost(reply, console)


def print_budget(reply: BudgetReply, out: Console) -> None:
    table = Table(title=f"Budget of {reply.user} (tenant {reply.tenant})")
    for name in ("scope", "window", "limit", "used", "reserved", "remaining", "cost", "resets at (UTC)"):
        table.add_column(name, justify="left" if name in ("scope", "window") else "right")
    for w in reply.windows:
        table.add_row(w.scope, f"{w.window} {w.start}", f"{w.limit:,}", f"{w.used:,}", f"{w.reserved:,}",
                      f"{w.remaining:,}", f"${w.cost_usd:.4f}", f"{w.resets_at:%Y-%m-%d %H:%M}")
    out.print(table)
    cap = f"{reply.per_task_tokens:,} tokens" if reply.per_task_tokens else "none"
    out.print(f"open tasks holding a reservation: {reply.open_tasks}; per-task cap: {cap}")


def print_cost(reply: CostReply, out: Console) -> None:
    out.print(f"task {reply.task_id} ({reply.tenant}/{reply.user}, {reply.status}): {reply.tokens:,} tokens, "
              f"${reply.cost_usd:.6f}; {reply.reserved_tokens:,} reserved at admission")
    steps = Table(title="per step")
    for name in ("step", "model", "input", "cached", "output", "cost", "over reservation"):
        steps.add_column(name, justify="left" if name in ("step", "model") else "right")
    for s in reply.steps:
        step = s.step_id.removeprefix(f"{reply.tenant}/")  # the first line names the tenant
        steps.add_row(step, s.model, f"{s.usage.input_tokens:,}", f"{s.usage.cached_tokens:,}",
                      f"{s.usage.output_tokens:,}", f"${s.cost_usd:.6f}", f"{s.over_reservation:,}")
    out.print(steps)
    failed = [s for s in reply.steps if s.failed]
    if failed:  # billed too: what their model calls used before they failed
        out.print("failed steps (billed for their model calls): " + ", ".join(
            f"{s.step_id.removeprefix(f'{reply.tenant}/')} {s.failed}, {s.usage.total:,} tokens" for s in failed))
    if reply.saved_tokens or reply.saved_usd:
        sources = sorted({s.saved for s in reply.steps if s.saved})
        out.print(f"saved {reply.saved_tokens:,} tokens, ${reply.saved_usd:.6f} ({', '.join(sources)} cache hits)")
    models = Table(title="per model")
    for name in ("model", "steps", "input", "cached", "output", "cost"):
        models.add_column(name, justify="left" if name == "model" else "right")
    for m in reply.models:
        models.add_row(m.model, str(m.steps), f"{m.input_tokens:,}", f"{m.cached_tokens:,}", f"{m.output_tokens:,}",
                       f"${m.cost_usd:.6f}")
    out.print(models)
    parts = _per_part(reply)
    if len(parts) > 1 or "(the task)" not in parts:
        tree = Table(title="per part of the plan")
        for name in ("part", "steps", "tokens", "cost"):
            tree.add_column(name, justify="left" if name == "part" else "right")
        for part, (steps, tokens, cost_usd) in parts.items():
            tree.add_row(part, str(steps), f"{tokens:,}", f"${cost_usd:.6f}")
        tree.add_row("total", str(sum(p[0] for p in parts.values())), f"{reply.tokens:,}", f"${reply.cost_usd:.6f}")
        out.print(tree)


def _per_part(reply: CostReply) -> dict[str, tuple[int, int, float]]:
    """Steps, tokens and cost of each part of an orchestrated task (its planning, each subtask, its synthesis),
    from its step ids (`<tenant>/<task>-<part>-s0a1`); a single task's steps are all "(the task)"."""
    parts: dict[str, tuple[int, int, float]] = {}
    for step in reply.steps:
        rest = step.step_id.removeprefix(f"{reply.tenant}/{reply.task_id}-")
        part = rest.rsplit("-", 1)[0] if "-" in rest else "(the task)"
        part = {"=plan": "planning (manager)", "=synthesis": "synthesis"}.get(part, part)
        steps, tokens, cost_usd = parts.get(part, (0, 0, 0.0))
        parts[part] = (steps + 1, tokens + step.usage.total, cost_usd + step.cost_usd)
    return parts


def _ask(nats: str | None, config: Path | None, ask):
    """Run one query against the budget service; no answer is a BudgetUnavailable, and errors exit 3."""

    async def asked(client: Client):
        try:
            return await ask(client)
        except (TimeoutError, NoRespondersError) as exc:
            raise BudgetUnavailable("no budget service answered: is the stack running? (`corral up`, or "
                                    "pass --nats)") from exc

    return call(nats, config, asked)
