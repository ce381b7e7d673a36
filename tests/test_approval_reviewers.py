"""Who decides: `corral approvals` run as a real process with a reviewer's credential decides as that reviewer,
and nats-server refuses a decision sent on another reviewer's subject, so no one decides as someone else."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from contracts import TaskCompleted
from contracts.approvals import DecideApproval
from services import auth
from services.client import Client
from tests.conftest import HARNESS, TENANTS, auth_dir_of, write_test_config
from tests.test_approval_gates import Run, decide, gated_stack, pay, site, waiting_approval  # noqa: F401 (fixture)

pytestmark = [pytest.mark.anyio, pytest.mark.integration]
REVIEWERS = ("alice", "carol")
CORRAL = [sys.executable, "-m", "services.cli"]


@pytest.fixture
def auth_dir(tmp_path: Path) -> Path:
    """The test's identities (conftest's), and two reviewers: alice (in the group) and carol (not)."""
    directory = tmp_path / "nats" / auth.AUTH_DIR
    auth.init(directory, TENANTS, REVIEWERS)
    auth.write_seed(directory.parent / HARNESS)
    write_test_config(directory)
    return directory


def as_identity(settings, identity: str, *args: str) -> subprocess.CompletedProcess:
    credential = auth.credential(auth_dir_of(settings), identity)
    return subprocess.run([*CORRAL, "approvals", *args, "--nats", settings.nats_url], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "COLUMNS": "200",
                                                      "CORRAL_NATS_CREDENTIALS": str(credential)})


async def test_a_reviewers_credential_decides_as_that_reviewer_and_one_outside_the_group_is_refused(
        settings, site, tenant, user):  # noqa: F811 (the fixture)
    async with gated_stack(settings, site) as (client, _):
        run = Run(client, pay(site), tenant, user)
        approval = await waiting_approval(client, run.task_id)
        approval_id = approval.request.approval_id
        listed = await anyio.to_thread.run_sync(as_identity, settings, "reviewer-carol", "list")
        by_carol = await anyio.to_thread.run_sync(as_identity, settings, "reviewer-carol", "approve", approval_id)
        by_alice = await anyio.to_thread.run_sync(as_identity, settings, "reviewer-alice", "approve", approval_id,
                                                  "--reason", "checked the amount")
        end = await run.ended()
        shown = await anyio.to_thread.run_sync(as_identity, settings, "reviewer-alice", "show", approval_id)
        history = await anyio.to_thread.run_sync(as_identity, settings, "operator", "history", "--task", run.task_id)
    assert approval_id in listed.stdout, listed.stdout + listed.stderr
    assert by_carol.returncode == 1 and "reviewer 'carol' may not decide for tenant 'default'" in by_carol.stdout
    assert by_alice.returncode == 0, by_alice.stdout + by_alice.stderr
    assert f"{approval_id}: approved by alice" in by_alice.stdout
    assert isinstance(end, TaskCompleted) and site.hits == 1
    assert "would run: http_get" in shown.stdout and "approved" in shown.stdout
    assert f"requested {approval_id}" in history.stdout and f"approved {approval_id} by alice: checked the amount" \
        in history.stdout


@pytest.mark.refused
async def test_the_server_refuses_a_decision_sent_on_another_reviewers_subject(
        settings, site, tenant, user):  # noqa: F811 (the fixture)
    async with gated_stack(settings, site) as (client, _):
        run = Run(client, pay(site), tenant, user)
        approval = await waiting_approval(client, run.task_id)
        carol = settings.with_changes(nats_credentials=str(auth.credential(auth_dir_of(settings), "reviewer-carol")))
        async with Client.connect(carol, "carol", reviewer="carol") as as_carol:
            with pytest.raises((NatsTimeout, NoRespondersError)):  # the publish is refused: nobody answers
                await as_carol.decide_approval(decide(approval, "approve"), reviewer="alice", timeout=1.0)
        still = await client.task_status(run.task_id, tenant=tenant)
        await client.decide_approval(decide(approval, "deny", reason="cleanup"), reviewer="operator")
        await run.ended()
    assert still.status == "waiting_for_approval" and site.hits == 0
    assert "reviewer" not in DecideApproval.__struct_fields__  # the command cannot name who decides
