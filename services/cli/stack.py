"""`corral service`, `corral up`, `corral demo`: run one service, the whole stack, or the demo on it."""

from __future__ import annotations

import shutil
import signal
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Optional

import anyio
import typer

from services.cli.common import DATA_DIR, ConfigOption, NatsOption, console, resolve_settings
from shared.config import load_settings
from shared.errors import CorralError

app = typer.Typer()
InsecureOption = Annotated[bool, typer.Option("--insecure", help="no auth: anyone may connect and publish anything")]
ModelOption = Annotated[str, typer.Option(
    "--model", help="`simulated`: the policy's chains as they are; `local`: also run a local llama.cpp server "
                    "(SmolLM2-135M, on this machine's CPU) and put every agent on it (a new policy version)")]


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
    settings = resolve_settings(nats, config, auth.identity_for(label))
    run_service(label, main, settings.with_changes(nats_credentials=str(credentials)) if credentials else settings)


@app.command()
def up(
    nats: NatsOption = None,
    config: ConfigOption = None,
    data_dir: Annotated[Path, typer.Option(help="where the embedded server keeps its store, logs and keys")] = DATA_DIR,
    insecure: InsecureOption = False,
    model: ModelOption = "simulated",
    autoscale: Annotated[bool, typer.Option(
        "--autoscale", help="start and stop service processes as the monitor's ScaleAdvice says")] = False,
) -> None:
    """Run the whole stack until Ctrl-C: an embedded nats-server (unless --nats) and every service, each signing
    in with its own identity (made under DATA_DIR/auth on first use)."""
    from services import auth
    from services.stack import Services

    if model not in ("simulated", "local"):
        raise typer.BadParameter(f"--model is `simulated` or `local`, not {model!r}")
    _sigterm_as_ctrl_c()
    keys = None if insecure else auth.prepare(data_dir)
    with _maybe_embedded(nats, data_dir, keys) as url, _maybe_local_model(model, data_dir) as model_url:
        env = {**_config_env(config), **({"CORRAL_LOCAL_MODEL_URL": model_url} if model_url else {})}
        services = Services(url, data_dir / "logs", env=env, auth_dir=keys)
        services.start()
        if model_url:
            version = _every_agent_on_local(url, keys)
            console.print(f"local model at {model_url}; policy version {version} puts every agent on it "
                          f"(`corral policy rollback` undoes that)")
        console.print(f"[green]Corral is up[/] on {url}; logs in {data_dir / 'logs'}. Ctrl-C stops it.")
        console.print(f"  try: corral submit 'Summarise the design' --agent research --user alice --nats {url}")
        if keys:
            console.print(auth.sign_in_note(keys), markup=False, highlight=False)
        scaler = _maybe_autoscaler(autoscale, services, url, keys)
        try:
            while True:
                for proc in services.crashed():
                    console.print(f"[red]{proc.name} exited[/] ({proc.popen.returncode}); see {proc.log_path}")
                    services.processes.remove(proc)
                for line in scaler.reconcile() if scaler else ():
                    console.print(line, markup=False, highlight=False)
                time.sleep(1)
        except KeyboardInterrupt:
            console.print("stopping…")
        finally:
            if scaler:
                scaler.stop()
            services.stop()


@app.command()
def demo(
    tasks: Annotated[int, typer.Option(help="tasks to submit")] = 300,
    users: Annotated[int, typer.Option(help="distinct users")] = 36,
    rate: Annotated[float, typer.Option(help="submissions per second")] = 150.0,
    nats: NatsOption = None,
    data_dir: Annotated[Path, typer.Option(help="fresh store for the demo (wiped first)")] = DATA_DIR / "demo",
    insecure: InsecureOption = False,
    local_model: Annotated[bool, typer.Option(
        "--local-model/--no-local-model", help="also send a few tasks to a real model: llama.cpp's server, "
                                               "started here, with SmolLM2-135M on the CPU")] = True,
) -> None:
    """Start the embedded stack, drive a mixed workload with the SIMULATED model (and a few tasks to a real
    local one), print a summary."""
    from services import auth
    from services import demo as demo_mod
    from services.stack import DEFAULT_AGENTS, Services

    _sigterm_as_ctrl_c()
    if not nats and data_dir.exists():
        shutil.rmtree(data_dir)
    env = {"CORRAL_SIM_FAILURE_RATE": "0.08", "CORRAL_SIM_LATENCY_S": "0.05"}
    keys = None if insecure else auth.prepare(data_dir, (*auth.DEFAULT_TENANTS, *demo_mod.TENANTS))
    with _maybe_embedded(nats, data_dir, keys) as url, \
            _maybe_local_model("local" if local_model else "simulated", data_dir) as model_url:
        agents = (*DEFAULT_AGENTS, demo_mod.LOCAL_AGENT) if model_url else DEFAULT_AGENTS
        services = Services(url, data_dir / "logs", env={**env, "CORRAL_LOCAL_MODEL_URL": model_url},
                            auth_dir=keys, agents=agents)
        services.start()
        try:
            operator = auth.signed_in(load_settings().with_changes(nats_url=url), keys)
            summary = anyio.run(demo_mod.run, operator, tasks, users, rate, services.names(), bool(model_url),
                                backend_options={"use_uvloop": True})
        finally:
            services.stop()
    demo_mod.print_summary(summary, console)
    if summary.lost:
        raise typer.Exit(1)


def _maybe_autoscaler(autoscale: bool, services, url: str, keys: Path | None):
    """With --autoscale: an Autoscaler listening as the operator (services/autoscale.py); else None."""
    if not autoscale:
        return None
    from services import auth
    from services.autoscale import Autoscaler

    scaler = Autoscaler(services)
    scaler.start(auth.signed_in(load_settings().with_changes(nats_url=url), keys))
    console.print("autoscaling on the monitor's advice (min/max per service: the policy's [scaling])")
    return scaler


def _maybe_local_model(model: str, data_dir: Path):
    if model != "local":
        return nullcontext("")
    from services.local_model import local_model_server

    return local_model_server(data_dir / "logs")


def _every_agent_on_local(url: str, keys: Path | None) -> int:
    """Apply the current policy with every agent's chain on the local model; its version."""
    from services import auth
    from services.stack import every_agent_on_local
    from shared.bus import Bus
    from shared.policy import apply_policy, read_policy

    async def go() -> int:
        async with Bus.connect(auth.signed_in(load_settings().with_changes(nats_url=url), keys), "cli") as bus:
            kv = await bus.policy_bucket()
            return await apply_policy(kv, every_agent_on_local((await read_policy(kv))[1]))

    return anyio.run(go)


def _sigterm_as_ctrl_c() -> None:
    """SIGTERM (e.g. from `timeout` or a supervisor) unwinds like Ctrl-C, so the services we
    started, which run in their own sessions, are stopped rather than orphaned. It raises
    KeyboardInterrupt itself: a process started in the background by a shell ignores SIGINT."""
    signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def _config_env(config: Path | None) -> dict[str, str]:
    return {"CORRAL_CONFIG": str(config.resolve())} if config else {}


def _maybe_embedded(nats: str | None, data_dir: Path, keys: Path | None):
    from services import auth
    from services.stack import nats_server

    return nullcontext(nats) if nats else nats_server(data_dir, config=keys / auth.SERVER_CONFIG if keys else None)
