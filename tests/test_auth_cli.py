"""The commands around identities, as a user runs them: `corral auth init | show | revoke`, `corral up` with
auth on by default (and `--insecure`), `corral service --credentials`."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from contracts import TaskCompleted, TaskSpec
from services import auth
from services.client import Client
from services.stack import CORE_SERVICES, DEFAULT_AGENTS
from shared.bus import Bus
from shared.config import Settings
from shared.errors import CredentialRefused

pytestmark = pytest.mark.integration
CORRAL = [sys.executable, "-m", "services.cli"]
EVERY_SERVICE = [f"corral-{name}" for name in (*CORE_SERVICES, *(f"worker-{agent}" for agent in DEFAULT_AGENTS))]


def corral(*args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([*CORRAL, *args], capture_output=True, text=True, timeout=60, cwd=cwd,
                          env={**os.environ, "COLUMNS": "200", "CORRAL_NATS_CREDENTIALS": ""})
    assert not check or done.returncode == 0, done.stdout + done.stderr
    return done


def test_auth_init_makes_every_identity_says_what_each_may_do_and_revoke_removes_one(tmp_path):
    made = corral("auth", "init", "--data-dir", str(tmp_path), "--tenant", "acme").stdout
    keys = tmp_path / "auth"
    assert {p.name for p in keys.iterdir()} == {auth.SERVER_CONFIG, *(f"{name}.nk" for name in (
        *auth.SERVICE_IDENTITIES, auth.OPERATOR, "tenant-acme"))}
    assert re.search(r"tenant-acme\s+│ \S+tenant-acme\.nk\s+│ corral\.task\.submitted\.acme\s+│ corral\.task\.rejected"
                     r"\.acme", made), made
    assert "no embedded server runs" in made
    shown = corral("auth", "show", "--data-dir", str(tmp_path)).stdout
    revoked = corral("auth", "revoke", "tenant-acme", "--data-dir", str(tmp_path)).stdout
    unknown = corral("auth", "revoke", "tenant-acme", "--data-dir", str(tmp_path), check=False)
    assert "tenant-acme" in shown and "revoked tenant-acme" in revoked
    assert not (keys / "tenant-acme.nk").exists() and "tenant-acme" not in (keys / auth.SERVER_CONFIG).read_text()
    assert unknown.returncode == 2 and "no identity 'tenant-acme'" in unknown.stderr


def test_the_compose_auth_command_is_one_the_cli_accepts(tmp_path):
    import yaml

    command = yaml.safe_load((Path(__file__).resolve().parents[1] / "compose.yaml").read_text())["services"]["auth"][
        "command"]
    data_dir = command.index("--data-dir") + 1
    corral(*command[:data_dir], str(tmp_path), *command[data_dir + 1:])
    assert (tmp_path / "auth" / auth.SERVER_CONFIG).exists() and (tmp_path / "auth" / "tenant-default.nk").exists()


@pytest.mark.anyio
async def test_corral_up_runs_with_auth_by_default_a_tenant_key_runs_a_task_and_the_operators_commands_need_no_setting(
        tmp_path, user):
    keys = tmp_path / ".data" / "auth"
    with _up(tmp_path) as url:
        async with Client.connect(Settings(nats_url=url, nats_credentials=str(keys / "operator.nk"))) as operator:
            await operator.wait_ready(EVERY_SERVICE)  # a tenant may not declare the streams: the services do
        as_tenant = Settings(nats_url=url, nats_credentials=str(keys / "tenant-default.nk"))
        async with Client.connect(as_tenant, "default-app", tenant="default") as publisher:
            end = await publisher.run(TaskSpec(agent="research", prompt="hello"), tenant="default", user=user)
        with anyio.fail_after(10), pytest.raises(CredentialRefused, match="has none"):
            async with Bus.connect(Settings(nats_url=url), "anonymous"):
                pass
        status = corral("status", "--nats", url, cwd=tmp_path).stdout  # the operator's key, found under .data
    assert isinstance(end, TaskCompleted), end
    assert "events task.completed" in status


@pytest.mark.anyio
async def test_corral_up_insecure_lets_anyone_connect_as_before(tmp_path):
    with _up(tmp_path, "--insecure") as url:
        async with Bus.connect(Settings(nats_url=url), "anonymous") as bus:
            assert (await bus.js.account_info()).streams >= 1
    assert not (tmp_path / ".data" / "auth").exists()


def _as_a_background_job() -> None:
    """As a shell starts `corral up &`: SIGINT ignored, so only SIGTERM can stop it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _up:
    """`corral up` in `directory` (data dir ./.data), until the block ends; yields its URL once it is up."""

    def __init__(self, directory: Path, *args: str) -> None:
        self.directory, self.args = directory, args

    def __enter__(self) -> str:
        self.proc = subprocess.Popen([*CORRAL, "up", *self.args], cwd=self.directory, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, preexec_fn=_as_a_background_job,
                                     env={**os.environ, "COLUMNS": "200", "CORRAL_NATS_CREDENTIALS": ""})
        said = []
        for line in self.proc.stdout:  # the line comes once every process is started
            said.append(line)
            if found := re.search(r"Corral is up on (\S+);", line):
                return found[1]
        raise AssertionError("corral up ended: " + "".join(said))

    def __exit__(self, *_) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.communicate(timeout=30)


def test_a_service_given_a_credential_the_server_does_not_know_exits_at_once_and_says_what_to_do(settings, tmp_path):
    stranger = tmp_path / "stranger.nk"
    auth.write_seed(stranger)
    done = corral("service", "guard", "--nats", settings.nats_url, "--credentials", str(stranger), check=False)
    assert done.returncode != 0
    assert f"refused guard's credential {stranger}" in done.stderr and "`corral auth init`" in done.stderr
