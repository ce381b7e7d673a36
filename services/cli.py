"""`corral`: run the stack, one service, the demo; submit tasks; read status; write schemas; make identities."""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path
from typing import Annotated, Optional

import anyio
import typer
from rich.console import Console
from rich.table import Table

from contracts import TaskSpec
from services.budget import cli as budget_cli
from services.policy_cli import policy_app
from shared.config import Settings, load_settings
from shared.errors import CorralError

app = typer.Typer(help="Corral: a control plane for AI agents over NATS JetStream.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
app.add_typer(policy_app, name="policy")
console = Console()
DATA_DIR = Path(".data")

NatsOption = Annotated[Optional[str], typer.Option("--nats", help="NATS URL(s); default: CORRAL_NATS_URL or the config")]
ConfigOption = Annotated[Optional[Path], typer.Option("--config", help="TOML settings file (default: $CORRAL_CONFIG)")]
InsecureOption = Annotated[bool, typer.Option("--insecure", help="no auth: anyone may connect and publish anything")]
AuthDataDir = Annotated[Path, typer.Option("--data-dir", help="the identities are in its auth/ directory")]


def _settings(nats: str | None, config: Path | None, identity: str = "operator") -> Settings:
    from services import auth

    settings = auth.default_credential(load_settings(config), DATA_DIR, identity)
    return settings.with_changes(nats_url=nats) if nats else settings


@app.command()
def service(
    name: Annotated[str, typer.Argument(help="guard, budget, executor, breaker, monitor or worker")],
    agent: Annotated[Optional[str], typer.Option(help="agent kind, for `worker` (research, coding, writing…)")] = None,
    nats: NatsOption = None,
    config: ConfigOption = None,
    credentials: Annotated[Optional[Path], typer.Option(
        help="credential to sign in with; default: $CORRAL_NATS_CREDENTIALS, else its kind's in .data/auth")] = None,
) -> None:
    """Run ONE service against a NATS server. Start more of the same to scale it out."""
    from services import auth, registry
    from shared.runtime import run_service

    try:
        label, main = registry.resolve(name, agent)
    except CorralError as exc:
        raise typer.BadParameter(str(exc)) from exc
    settings = _settings(nats, config, auth.identity_for(label))
    run_service(label, main, settings.with_changes(nats_credentials=str(credentials)) if credentials else settings)


@app.command()
def up(
    nats: NatsOption = None,
    config: ConfigOption = None,
    data_dir: Annotated[Path, typer.Option(help="where the embedded server keeps its store, logs and keys")] = DATA_DIR,
    insecure: InsecureOption = False,
) -> None:
    """Run the whole stack until Ctrl-C: an embedded nats-server (unless --nats) and every service, each signing
    in with its own identity (made under DATA_DIR/auth on first use)."""
    from services import auth
    from services.stack import Services

    _sigterm_as_ctrl_c()
    keys = None if insecure else auth.prepare(data_dir)
    with _maybe_embedded(nats, data_dir, keys) as url:
        services = Services(url, data_dir / "logs", env=_config_env(config), auth_dir=keys)
        services.start()
        console.print(f"[green]Corral is up[/] on {url}; logs in {data_dir / 'logs'}. Ctrl-C stops it.")
        console.print(f"  try: corral submit 'Summarise the design' --agent research --user alice --nats {url}")
        if keys:
            console.print(auth.sign_in_note(keys), markup=False, highlight=False)
        try:
            while True:
                for proc in services.crashed():
                    console.print(f"[red]{proc.name} exited[/] ({proc.popen.returncode}); see {proc.log_path}")
                    services.processes.remove(proc)
                time.sleep(1)
        except KeyboardInterrupt:
            console.print("stopping…")
        finally:
            services.stop()


@app.command()
def demo(
    tasks: Annotated[int, typer.Option(help="tasks to submit")] = 300,
    users: Annotated[int, typer.Option(help="distinct users")] = 36,
    rate: Annotated[float, typer.Option(help="submissions per second")] = 150.0,
    nats: NatsOption = None,
    data_dir: Annotated[Path, typer.Option(help="fresh store for the demo (wiped first)")] = DATA_DIR / "demo",
    insecure: InsecureOption = False,
) -> None:
    """Start the embedded stack, drive a mixed workload with the SIMULATED model, print a summary."""
    from services import auth
    from services import demo as demo_mod
    from services.stack import Services

    _sigterm_as_ctrl_c()
    if not nats and data_dir.exists():
        shutil.rmtree(data_dir)
    env = {"CORRAL_SIM_FAILURE_RATE": "0.08", "CORRAL_SIM_LATENCY_S": "0.05"}
    keys = None if insecure else auth.prepare(data_dir, (*auth.DEFAULT_TENANTS, *demo_mod.TENANTS))
    with _maybe_embedded(nats, data_dir, keys) as url:
        services = Services(url, data_dir / "logs", env=env, auth_dir=keys)
        services.start()
        try:
            operator = auth.signed_in(load_settings().with_changes(nats_url=url), keys)
            summary = anyio.run(demo_mod.run, operator, tasks, users, rate, services.names(),
                                backend_options={"use_uvloop": True})
        finally:
            services.stop()
    demo_mod.print_summary(summary, console)
    if summary.lost:
        raise typer.Exit(1)


@app.command()
def submit(
    prompt: Annotated[str, typer.Argument(help="what the agent should do")],
    agent: Annotated[str, typer.Option(help="agent kind")] = "research",
    user: Annotated[str, typer.Option(help="user the task runs for")] = "alice",
    tenant: Annotated[str, typer.Option(help="tenant of the user")] = "default",
    max_tokens: Annotated[Optional[int], typer.Option(help="cap on output tokens")] = None,
    follow: Annotated[bool, typer.Option("--follow/--no-follow", help="wait and print progress until it ends")] = True,
    timeout: Annotated[float, typer.Option(help="seconds to wait with --follow")] = 60.0,
    nats: NatsOption = None,
    config: ConfigOption = None,
) -> None:
    """Submit one task (and by default follow it to its end)."""
    from services.client import Client

    from shared import tracing

    spec = TaskSpec(agent=agent, prompt=prompt, max_tokens=max_tokens)
    settings = _settings(nats, config)
    tracing.init_tracing("corral-cli", settings.otlp_endpoint)

    async def go() -> None:
        async with Client.connect(settings, "cli") as client:
            if not follow:
                console.print(await client.submit(spec, tenant=tenant, user=user))
                return
            end = await client.run(spec, tenant=tenant, user=user, timeout=timeout,
                                   on_progress=lambda p: console.print(f"  {p.stage}: {p.message}", markup=False))
            _print_terminal(end)

    try:
        _run_cli(go)
    finally:
        tracing.shutdown_tracing()


@app.command()
def status(
    task_id: Annotated[Optional[str], typer.Argument(help="a task id; omit for the whole system")] = None,
    nats: NatsOption = None,
    config: ConfigOption = None,
) -> None:
    """Show the monitor's live metrics, or one task's state."""
    from services.client import Client

    async def go() -> None:
        async with Client.connect(_settings(nats, config), "cli") as client:
            if task_id:
                console.print_json(data=__import__("msgspec").to_builtins(await client.task_status(task_id)))
            else:
                print_status(await client.status(), console)

    _run_cli(go)


@app.command()
def contracts(
    out: Annotated[Optional[Path], typer.Option(help="directory for the schemas (default: contracts/schemas)")] = None,
) -> None:
    """Write a JSON Schema per contract, for publishers in other languages."""
    from contracts.schema import SCHEMA_DIR, write_schemas

    for path in write_schemas(out or SCHEMA_DIR):
        console.print(f"wrote {path}")


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
    for durable, depth in sorted(report.queue_depth.items()):
        table.add_row(f"queue {durable}", str(depth))
    for dep, state in sorted(report.breakers.items()):
        table.add_row(f"breaker {dep}", state)
    out.print(table)


def _print_terminal(event) -> None:
    kind = type(event).__struct_config__.tag
    if kind == "task.completed":
        console.print(f"[green]completed[/] {event.task_id} in {event.attempts} attempt(s), "
                      f"{event.usage.input_tokens}+{event.usage.output_tokens} tokens")
        console.print(event.output, markup=False, highlight=False)
    elif kind == "task.rejected":
        console.print(f"[yellow]rejected[/] ({event.reason}) ", end="")
        console.print(event.message, markup=False)
        raise typer.Exit(2)
    else:
        console.print(f"[red]failed[/] ({event.reason}) ", end="")
        console.print(event.error, markup=False)
        raise typer.Exit(1)


def _run_cli(fn) -> None:
    try:
        anyio.run(fn, backend_options={"use_uvloop": True})
    except TimeoutError:
        console.print("[red]timed out[/]: is the stack running? (`corral up`, or pass --nats)")
        raise typer.Exit(3) from None
    except CorralError as exc:
        console.print(f"[red]error[/]: {exc}")
        raise typer.Exit(3) from None


def _sigterm_as_ctrl_c() -> None:
    """SIGTERM (e.g. from `timeout` or a supervisor) unwinds like Ctrl-C, so the services we
    started, which run in their own sessions, are stopped rather than orphaned."""
    signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))


def _config_env(config: Path | None) -> dict[str, str]:
    return {"CORRAL_CONFIG": str(config.resolve())} if config else {}


def _maybe_embedded(nats: str | None, data_dir: Path, keys: Path | None):
    from contextlib import nullcontext

    from services import auth
    from services.stack import nats_server

    return nullcontext(nats) if nats else nats_server(data_dir, config=keys / auth.SERVER_CONFIG if keys else None)


auth_app = typer.Typer(help="Identities: who may connect to NATS, and what each may publish and subscribe.",
                       no_args_is_help=True)


@auth_app.command("init")
def auth_init(
    tenant: Annotated[Optional[list[str]], typer.Option(help="a tenant to make a credential for (repeat)")] = None,
    data_dir: AuthDataDir = DATA_DIR,
) -> None:
    """Make the missing identities (every service kind, the operator, each --tenant), keep the existing keys, and
    write the server's configuration; an embedded server running on DATA_DIR reloads it."""
    from services import auth
    from services.stack import reload_note

    try:
        found = auth.init(auth.auth_dir(data_dir), tenant or ())
    except CorralError as exc:
        raise typer.BadParameter(str(exc)) from exc
    console.print(auth.table(found))
    console.print(reload_note(data_dir))


@auth_app.command("show")
def auth_show(data_dir: AuthDataDir = DATA_DIR) -> None:
    """List the identities, their credential files and what each may publish and subscribe."""
    from services import auth

    console.print(auth.table(auth.identities(auth.auth_dir(data_dir))))


@auth_app.command("revoke")
def auth_revoke(
    identity: Annotated[str, typer.Argument(help="e.g. tenant-acme; a service kind or `operator` gets a new key "
                                                 "at the next `corral auth init` or `corral up`")],
    data_dir: AuthDataDir = DATA_DIR,
) -> None:
    """Delete an identity's key and drop it from the server's configuration; an embedded server running on
    DATA_DIR reloads it and cuts off its connections."""
    from services import auth
    from services.stack import reload_note

    try:
        auth.revoke(auth.auth_dir(data_dir), identity)
    except CorralError as exc:
        raise typer.BadParameter(str(exc)) from exc
    console.print(f"revoked {identity}; {reload_note(data_dir)}")


app.add_typer(auth_app, name="auth")  # corral auth init | show | revoke
app.add_typer(budget_cli.app, name="budget")  # corral budget show USER
app.command()(budget_cli.cost)  # corral cost TASK_ID
from services.breaker.cli import breakers_app  # noqa: E402 - sub-commands, registered last
from services.workers.cli import sim_app  # noqa: E402

app.add_typer(breakers_app, name="breakers")
app.add_typer(sim_app, name="sim")

if __name__ == "__main__":
    app()
