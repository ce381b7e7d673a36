"""Identities and permissions: what a tenant's credential may not do is refused by nats-server itself and has
no effect; a credential the server does not know is refused at connect, with what to do.

Each forgery is made on a plain nats-py connection signed in as tenant acme, as any publisher's client would
be: the server reports a permissions violation to it (its error callback), and the test then looks for the
forgery's effect with the services running, and finds none."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import msgspec
import nats
import pytest
from nats.aio.client import Client as Nats

from contracts import (
    BreakerChanged,
    StepCompleted,
    StepFailed,
    TaskAdmitted,
    TaskCompleted,
    TaskSpec,
    TaskSubmitted,
    TaskValidated,
    TokenEstimate,
    Usage,
    subjects,
)
from services import auth
from services.client import Client
from services.stack import reload_server
from shared.bus import Bus
from shared.errors import CorralError, CredentialRefused
from tests.conftest import auth_dir_of, signed_in_as, stack, wait_until, write_test_config

pytestmark = [pytest.mark.anyio, pytest.mark.integration]
ATTACKER, VICTIM = "acme", "globex"
LARGE = "simulated/sim-large"
SPEC = TaskSpec(agent="research", prompt="Summarise the design")


class Refusals:
    """The asynchronous errors the server reports to one connection."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self._send, self._receive = anyio.create_memory_object_stream[str](1000)

    async def on_error(self, exc: Exception) -> None:
        self.seen.append(str(exc))
        self._send.send_nowait(str(exc))

    async def of(self, action: str, subject: str, timeout: float = 5.0) -> None:
        """Wait until the server refused `action` ("publish" or "subscription") to `subject`."""
        wanted = f'permissions violation for {action} to "{subject.lower()}"'  # nats-py lower-cases the line
        with anyio.fail_after(timeout):
            while not any(wanted in seen for seen in self.seen):
                await self._receive.receive()


@asynccontextmanager
async def signed_in(settings, identity: str, tenant: str | None = None) -> AsyncIterator[tuple[Nats, Refusals]]:
    """A plain nats-py connection signed in as `identity` (a tenant's with its inbox prefix), and the refusals
    the server reports to it."""
    refusals = Refusals()
    nc = await nats.connect(settings.nats_url, nkeys_seed=signed_in_as(settings, identity).nats_credentials,
                            inbox_prefix=subjects.tenant_inbox(tenant) if tenant else "_INBOX",
                            error_cb=refusals.on_error, allow_reconnect=False)
    try:
        yield nc, refusals
    finally:
        await nc.close()


def attacker(settings):
    return signed_in(settings, auth.tenant_identity(ATTACKER), tenant=ATTACKER)


async def forge(nc: Nats, refusals: Refusals, subject: str, event, headers: dict[str, str] | None = None) -> None:
    """Publish `event` on `subject`; return once the server has refused it."""
    await nc.publish(subject, msgspec.json.encode(event), headers=headers)
    await refusals.of("publish", subject)


async def stored(client: Client, subject: str) -> int:
    """How many messages the stream of `subject` holds on it."""
    stream = await client.bus.js.find_stream_name_by_subject(subject)
    info = await client.bus.js.stream_info(stream, subjects_filter=subject)
    return (info.state.subjects or {}).get(subject, 0)


def step_completed(task_id: str, user: str, step_id: str, tokens: int, output: str) -> StepCompleted:
    return StepCompleted(task_id=task_id, tenant=VICTIM, user=user, step_id=step_id, attempt=1, agent="research",
                         dependency=LARGE, model="sim-large", output=output, latency_ms=1.0,
                         usage=Usage(input_tokens=tokens // 2, output_tokens=tokens - tokens // 2))


def step_failed(n: int, user: str) -> StepFailed:
    return StepFailed(task_id=f"forged-{n}", tenant=ATTACKER, user=user, step_id=f"forged-{n}-s0a1", attempt=1,
                      agent="research", dependency=LARGE, error="transient", message="forged")


async def test_a_tenants_credential_submits_its_own_task_and_hears_its_progress_and_end(settings, user):
    as_tenant = signed_in_as(settings, auth.tenant_identity(ATTACKER))
    async with stack(settings), Client.connect(as_tenant, "acme-app", tenant=ATTACKER) as publisher:
        progress = []
        end = await publisher.run(SPEC, tenant=ATTACKER, user=user, on_progress=progress.append)
    assert isinstance(end, TaskCompleted) and end.tenant == ATTACKER, end
    assert progress and all(p.task_id == end.task_id for p in progress)


async def test_a_tenants_client_will_not_even_try_to_submit_another_tenants_task(settings, user):
    as_tenant = signed_in_as(settings, auth.tenant_identity(ATTACKER))
    async with Client.connect(as_tenant, "acme-app", tenant=ATTACKER) as publisher:
        with pytest.raises(CorralError, match="tenant 'acme''s: it may submit only its tasks, not 'globex''s"):
            await publisher.submit(SPEC, tenant=VICTIM, user=user)


@pytest.mark.refused
async def test_a_tenant_cannot_submit_on_another_tenants_ingress_subject(settings, user):
    forged = TaskSubmitted(task_id="forged-ingress", tenant=VICTIM, user=user, spec=SPEC)
    async with stack(settings, "guard") as client, attacker(settings) as (nc, refused):
        await forge(nc, refused, subjects.task_submitted(VICTIM), forged)
        assert await stored(client, subjects.task_submitted(VICTIM)) == 0  # so no guard can see it


@pytest.mark.refused
async def test_a_tenant_cannot_publish_an_admission_that_skips_the_guard_and_the_budget(settings, user):
    forged = TaskAdmitted(task_id="forged-admission", tenant=ATTACKER, user=user, spec=SPEC, reserved_tokens=0,
                          window="d", estimate=TokenEstimate(prompt_tokens=1, max_output_tokens=1))
    async with stack(settings) as client, attacker(settings) as (nc, refused):
        await forge(nc, refused, subjects.task_admitted(ATTACKER), forged)
        assert await stored(client, subjects.task_admitted(ATTACKER)) == 0
        assert not (await client.task_status(forged.task_id, tenant=forged.tenant)).found  # never started


@pytest.mark.refused
async def test_a_tenant_cannot_bill_a_victim_a_million_tokens_for_a_task_that_never_existed(settings, user):
    forged = step_completed("never-existed", user, "never-existed-s0a1", 1_000_000, "forged")
    async with stack(settings) as client, attacker(settings) as (nc, refused):
        await forge(nc, refused, subjects.step_completed(VICTIM), forged)
        assert await stored(client, subjects.step_completed(VICTIM)) == 0
        budget = await client.budget(VICTIM, user)
    assert budget.windows and all(window.used == 0 for window in budget.windows), budget


@pytest.mark.refused
async def test_a_tenant_cannot_end_a_running_task_with_a_forged_step_result(settings, user):
    slow = TaskSpec(agent="research", prompt="take a while [sim:latency=1.5]")
    async with stack(settings) as client, client.events(ends_only=True) as ends, attacker(settings) as (nc, refused):
        task_id = await client.submit(slow, tenant=VICTIM, user=user)
        running = await wait_until(lambda: _running_step(client, VICTIM, task_id))
        await forge(nc, refused, subjects.step_completed(VICTIM), step_completed(task_id, user, running, 10, "forged"))
        with anyio.fail_after(15):
            end = await anext(e async for e in ends if e.task_id == task_id)
    assert isinstance(end, TaskCompleted) and end.output.startswith("[simulated sim-large]"), end


async def _running_step(client: Client, tenant: str, task_id: str) -> str | None:
    status = await client.task_status(task_id, tenant=tenant)
    return status.step_id if status.found and status.status == "running" and status.step_id else None


@pytest.mark.refused
async def test_six_forged_step_failures_cannot_open_the_breaker_every_tenant_shares(settings, user):
    async with stack(settings, "breaker") as client, client.events(breakers=True) as events:
        async with attacker(settings) as (nc, refused):
            for n in range(6):
                await forge(nc, refused, subjects.step_failed(ATTACKER), step_failed(n, user))
        assert await stored(client, subjects.step_failed(ATTACKER)) == 0
        assert [r for r in await client.breakers() if r.state != "closed"] == []
        async with signed_in(settings, auth.WORKER) as (worker, _):  # the same six from a worker do open it
            for n in range(6):
                await worker.publish(subjects.step_failed(ATTACKER), msgspec.json.encode(step_failed(n, user)))
            with anyio.fail_after(10):
                opened = await anext(e async for e in events if isinstance(e, BreakerChanged))
    assert (opened.dependency, opened.state) == (LARGE, "open")


@pytest.mark.refused
async def test_a_tenant_cannot_plant_a_message_id_that_would_drop_a_tasks_real_validation(settings, user):
    task_id = "planted-id"
    planted = TaskValidated(task_id=task_id, tenant=ATTACKER, user=user, spec=SPEC,
                            estimate=TokenEstimate(prompt_tokens=1, max_output_tokens=1))
    async with stack(settings) as client, attacker(settings) as (nc, refused):
        await forge(nc, refused, subjects.task_validated(ATTACKER), planted,
                    headers={subjects.HEADER_MSG_ID: planted.dedup_key()})
        assert await stored(client, subjects.task_validated(ATTACKER)) == 0
        async with client.events(ends_only=True) as ends:
            await client.submit(SPEC, tenant=ATTACKER, user=user, task_id=task_id)
            with anyio.fail_after(15):
                end = await anext(e async for e in ends if e.task_id == task_id)
    assert isinstance(end, TaskCompleted), end  # its validation was stored, not taken for a duplicate


@pytest.mark.refused
async def test_a_tenant_cannot_hear_another_tenants_outcomes(settings, user):
    async with stack(settings) as client, attacker(settings) as (nc, refused):
        overheard = await nc.subscribe(subjects.task_completed(VICTIM))
        await refused.of("subscription", subjects.task_completed(VICTIM))
        end = await client.run(SPEC, tenant=VICTIM, user=user)
        await nc.flush()  # anything the server sent this connection before has arrived now
    assert isinstance(end, TaskCompleted)
    assert overheard.pending_msgs == 0


@pytest.mark.refused
@pytest.mark.parametrize(("action", "subject"), [
    ("publish", "$JS.API.STREAM.LIST"),
    ("publish", f"$JS.API.CONSUMER.CREATE.{subjects.STREAM_TASKS}"),
    ("publish", f"$JS.API.DIRECT.GET.KV_{subjects.KV_BUDGET}.$KV.{subjects.KV_BUDGET}.acct"),
    ("publish", f"$KV.{subjects.KV_BUDGET}.acct"),
    ("publish", f"$KV.{subjects.KV_POLICY}.current"),
    ("subscription", "$KV.>"),
    ("subscription", "$JS.API.>"),
    ("subscription", "_INBOX.>"),
    ("subscription", subjects.ALL_STEP_EVENTS),
])
async def test_a_tenant_has_no_jetstream_api_no_bucket_and_no_other_inbox(settings, action, subject):
    async with attacker(settings) as (nc, refused):
        if action == "publish":
            await nc.publish(subject, b"{}", reply=f"{subjects.tenant_inbox(ATTACKER)}.probe")
        else:
            await nc.subscribe(subject)
        await refused.of(action, subject)


async def test_a_credential_the_server_does_not_know_is_refused_at_connect_with_what_to_do(settings, tmp_path):
    stranger = tmp_path / "stranger.nk"
    auth.write_seed(stranger)
    with anyio.fail_after(10), pytest.raises(CredentialRefused, match=r"refused test's credential .*stranger\.nk"
                                                                       r".*`corral auth init`"):
        async with Bus.connect(settings.with_changes(nats_credentials=str(stranger)), "test"):
            pass


async def test_a_process_with_no_credential_is_told_which_setting_to_set(settings):
    with anyio.fail_after(10), pytest.raises(CredentialRefused, match="has none.*CORRAL_NATS_CREDENTIALS"):
        async with Bus.connect(settings.with_changes(nats_credentials=""), "test"):
            pass


async def test_a_credential_file_that_is_missing_is_named_before_any_connection(settings, tmp_path):
    with pytest.raises(CredentialRefused, match=r"cannot read the NATS credential .*nowhere\.nk"):
        async with Bus.connect(settings.with_changes(nats_credentials=str(tmp_path / "nowhere.nk")), "test"):
            pass


async def test_a_revoked_tenant_is_cut_off_and_refused_once_the_server_reloads(settings, tmp_path):
    directory = auth_dir_of(settings)
    kept_copy = tmp_path / "globex-copy.nk"
    shutil.copy(auth.credential(directory, auth.tenant_identity(VICTIM)), kept_copy)
    as_victim = settings.with_changes(nats_credentials=str(kept_copy))
    async with Bus.connect(as_victim, "globex-app", tenant=VICTIM) as connected:
        auth.revoke(directory, auth.tenant_identity(VICTIM))
        write_test_config(directory)
        assert reload_server(directory.parent)
        await wait_until(lambda: _closed(connected))
    with anyio.fail_after(10), pytest.raises(CredentialRefused, match="never added, or revoked"):
        async with Bus.connect(as_victim, "globex-app", tenant=VICTIM):
            pass
    assert not auth.credential(directory, auth.tenant_identity(VICTIM)).exists()


async def _closed(bus: Bus) -> bool:
    return not bus.nc.is_connected

