"""Alerts on a real server: a rule of the policy fires once, is sent to NATS and to a webhook (a real HTTP
server that fails once first), resolves at its resolve threshold; `corral alerts` lists, tells the history
and silences."""

from __future__ import annotations

import json
import os
import sys
import threading
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator, Union

import anyio
import msgspec
import pytest

from contracts import TaskCompleted, TaskFailed, subjects
from contracts.events import Alert, AlertResolved, Usage
from contracts.policy import AlertRule, Alerting, Policy, Webhook
from services.client import Client
from tests.conftest import apply, operator_env, running, wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.integration]
ENCODER = msgspec.json.Encoder()
ALERT_EVENTS = msgspec.json.Decoder(Union[Alert, AlertResolved])
ERRORS = AlertRule(name="errors", figure="error_rate", above=0.2, resolve_at=0.1, window="1m", severity="critical")


class Hooks:
    """A webhook receiver: answers 503 to the first `fail_first` POSTs, then 200; keeps what it got."""

    def __init__(self, fail_first: int) -> None:
        self.fail_first = fail_first
        self.bodies: list[dict] = []
        self.tries = 0
        self.lock = threading.Lock()


@contextmanager
def webhook_server(fail_first: int = 1) -> Iterator[tuple[str, Hooks]]:
    hooks = Hooks(fail_first)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers["content-length"]))
            with hooks.lock:
                hooks.tries += 1
                failing = hooks.tries <= hooks.fail_first
                if not failing:
                    hooks.bodies.append(json.loads(body))
            self.send_response(503 if failing else 200)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", hooks
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def alerting_policy(*rules: AlertRule, webhooks: list[Webhook] = ()) -> Policy:
    return Policy(alerting=Alerting(rules=list(rules), webhooks=list(webhooks), evaluate_every_s=0.1))


async def publish_tasks(client: Client, tenant: str, prefix: str, ok: int, failed: int) -> None:
    received = datetime.now(UTC) - timedelta(seconds=1)
    for n in range(ok):
        await client.bus.js.publish(subjects.task_completed(tenant), ENCODER.encode(TaskCompleted(
            task_id=f"{prefix}-ok-{n}", tenant=tenant, user="u", output="o", attempts=1, model="m",
            usage=Usage(input_tokens=1, output_tokens=1), received_at=received)))
    for n in range(failed):
        await client.bus.js.publish(subjects.task_failed(tenant), ENCODER.encode(TaskFailed(
            task_id=f"{prefix}-failed-{n}", tenant=tenant, user="u", reason="attempts_exhausted", error="down",
            attempts=[], received_at=received)))


async def next_alert(sub) -> Alert | AlertResolved:
    return ALERT_EVENTS.decode((await sub.next_msg(timeout=20)).data)


async def test_an_alert_fires_once_to_nats_and_a_webhook_and_resolves_at_its_resolve_threshold(settings, tenant):
    with webhook_server(fail_first=1) as (url, hooks):
        await apply(settings, alerting_policy(ERRORS, webhooks=[Webhook(url=url, timeout_s=2, retries=2)]))
        async with Client.connect(settings, "test") as client, running(settings, "monitor"):
            await client.wait_ready({"corral-monitor"}, timeout=90)
            sub = await client.bus.nc.subscribe(subjects.ALL_ALERTS)
            await publish_tasks(client, tenant, "a", ok=2, failed=3)
            fired = await next_alert(sub)
            firing = (await client.alerts()).firing
            await publish_tasks(client, tenant, "b", ok=10, failed=0)  # 3 of 15: 20 %, not above 20 %
            await publish_tasks(client, tenant, "c", ok=20, failed=0)  # 3 of 35: below the resolve threshold
            resolved = await next_alert(sub)
            history = (await client.alerts(history=True)).history

            async def both_posted():
                return len(hooks.bodies) == 2
            await wait_until(both_posted, timeout=20)
    assert isinstance(fired, Alert) and (fired.rule, fired.scope, fired.severity) == ("errors", "all", "critical")
    assert fired.value > 0.2 and fired.threshold == 0.2
    assert [a.rule for a in firing] == ["errors"]
    assert isinstance(resolved, AlertResolved) and resolved.started_at == fired.started_at
    assert resolved.value <= 0.1
    assert [type(e).__name__ for e in history] == ["Alert", "AlertResolved"]
    assert [body["kind"] for body in hooks.bodies] == ["alert.firing", "alert.resolved"]
    assert hooks.tries == 3  # the first POST got a 503 and was tried again


async def test_corral_alerts_lists_the_firing_alerts_and_silences_a_rule_and_corral_status_shows_the_windows(settings, tenant):
    await apply(settings, alerting_policy(ERRORS))
    env = {**os.environ, **operator_env(settings), "CORRAL_NATS_URL": settings.nats_url}

    async def corral(*args: str) -> str:
        done = await anyio.run_process([sys.executable, "-m", "services.cli", *args], env=env, check=False)
        assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
        return done.stdout.decode()

    async with Client.connect(settings, "test") as client, running(settings, "monitor"):
        await client.wait_ready({"corral-monitor"}, timeout=90)
        await publish_tasks(client, tenant, "a", ok=0, failed=2)

        async def firing():
            return (await client.alerts()).firing
        await wait_until(firing, timeout=20)
        listed = await corral("alerts")
        told = await corral("alerts", "history")
        silenced = await corral("alerts", "silence", "errors", "--for", "1h")
        status = await corral("status")
        silences = (await client.alerts()).silences
    assert "errors" in listed and "critical" in listed and "firing" in listed
    assert "errors" in told
    assert "silenced: errors until" in silenced
    assert "1m: tasks, p95 (ms), errors, tokens/h" in status and "2 / " in status
    assert silences["errors"] > datetime.now(UTC).timestamp() + 3500


async def test_an_alert_book_that_does_not_decode_is_quarantined_and_alerting_goes_on(settings, tenant):
    from tests.test_poison import GARBAGE, dead_letters

    await apply(settings, alerting_policy(ERRORS))
    async with Client.connect(settings, "test") as client:
        kv = await client.bus.bucket(subjects.KV_MONITOR)
        revision = await kv.put("alerts", GARBAGE)
        async with running(settings, "monitor"):
            await client.wait_ready({"corral-monitor"}, timeout=90)
            await publish_tasks(client, tenant, "poisoned", ok=0, failed=2)

            async def firing():
                return (await client.alerts()).firing
            [alert] = await wait_until(firing, timeout=20)
        letters = [letter for letter in await dead_letters(client.bus.js)
                   if letter.subject == f"$KV.{subjects.KV_MONITOR}.alerts"]
    assert alert.rule == "errors"
    assert [letter.payload for letter in letters] == [GARBAGE]
    assert f"revision {revision} does not decode" in letters[0].reason


@pytest.mark.parametrize("subject, payload", [
    (subjects.MONITOR_SILENCE, b"{not json"),
    (subjects.MONITOR_SILENCE, b'{"rule": "no spaces allowed", "for_s": 60}'),
    (subjects.MONITOR_SILENCE, b'{"rule": "errors", "for_s": 1e30}'),
    (subjects.MONITOR_ALERTS, b"[" * 100_000),
])
async def test_a_malformed_alerts_request_is_refused_with_its_reason_and_the_monitor_keeps_answering(
        settings, subject, payload):
    async with Client.connect(settings, "test") as client, running(settings, "monitor"):
        await client.wait_ready({"corral-monitor"}, timeout=90)
        answer = await client.bus.nc.request(subject, payload, timeout=5)
        after = await client.alerts()
    assert answer.headers and answer.headers.get("Nats-Service-Error-Code") == "500"
    assert answer.headers.get("Nats-Service-Error")
    assert after.silences == {}


async def test_two_monitor_replicas_send_one_alert_between_them(settings, tenant):
    await apply(settings, alerting_policy(ERRORS))
    async with Client.connect(settings, "test") as client, running(settings, "monitor", "monitor"):
        async def replicas():
            stats = await client.replica_stats("corral-monitor", gather_s=0.2)
            return {s["id"]: s["endpoints"][0]["data"]["alerts"] for s in stats} if len(stats) == 2 else None

        await wait_until(replicas, timeout=20)
        sub = await client.bus.nc.subscribe(subjects.ALL_ALERTS)
        await publish_tasks(client, tenant, "a", ok=0, failed=3)
        fired = await next_alert(sub)
        seen = await replicas()

        async def both_evaluated_twice_more():  # each replica saw the alert's condition and tried to fire it
            now = await replicas()
            return now and all(now[r]["evaluations"] >= seen[r]["evaluations"] + 2 for r in seen)
        await wait_until(both_evaluated_twice_more, timeout=20)
        await publish_tasks(client, tenant, "b", ok=40, failed=0)
        resolved = await next_alert(sub)
        counts = await replicas()
    assert isinstance(fired, Alert) and isinstance(resolved, AlertResolved)
    assert sum(c["fired"] for c in counts.values()) == 1
    assert sum(c["resolved"] for c in counts.values()) == 1


async def test_corral_top_and_the_dashboards_samples_show_the_alerts_firing(settings, tenant):
    from services.dashboard.samples import History, observe

    await apply(settings, alerting_policy(ERRORS))
    env = {**os.environ, **operator_env(settings), "CORRAL_NATS_URL": settings.nats_url, "COLUMNS": "160"}
    async with Client.connect(settings, "test") as client, running(settings, "monitor"):
        await client.wait_ready({"corral-monitor"}, timeout=90)
        quiet = await observe(client, History(), 0.0)
        await publish_tasks(client, tenant, "a", ok=0, failed=2)

        async def firing():
            return (await client.alerts()).firing
        await wait_until(firing, timeout=20)
        sample = await observe(client, History(), 1.0)
        done = await anyio.run_process([sys.executable, "-m", "services.cli", "top", "--once"], env=env, check=False)
    frame = done.stdout.decode()
    assert quiet.alerts == []
    assert [(a["rule"], a["severity"], a["scope"]) for a in sample.alerts] == [("errors", "critical", "all")]
    assert done.returncode == 0, frame + done.stderr.decode()
    alerts_row = next(line for line in frame.splitlines() if line.split()[:1] == ["errors"])
    assert "critical" in alerts_row and "all" in alerts_row
