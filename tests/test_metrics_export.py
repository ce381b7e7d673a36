"""The monitor's `/metrics`: scraped over HTTP and parsed with prometheus_client's parser; a request that is
not a scrape is refused with its reason."""

from __future__ import annotations

import socket

import anyio
import httpx
import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from contracts import BreakerChanged, StepCompleted, subjects
from contracts.events import Usage
from contracts.policy import AlertRule, Alerting, Policy, Price
from services.client import Client
from tests.conftest import apply, running, wait_until
from tests.test_alerts import publish_tasks
from tests.test_poison import service_stats

pytestmark = [pytest.mark.anyio, pytest.mark.integration]
ENCODER = msgspec.json.Encoder()


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


async def scraped_port(client: Client) -> int:
    async def port():
        return max(0, (await service_stats(client, "monitor")).get("metrics_port", -1))
    return await wait_until(port, timeout=20)


async def test_a_scrape_of_metrics_parses_and_carries_the_monitors_figures(settings, tenant):
    await apply(settings, Policy(prices={"m": Price(input=1.0, output=1.0)}, alerting=Alerting(
        rules=[AlertRule(name="errors", figure="error_rate", above=0.1, severity="critical")], evaluate_every_s=0.1)))
    settings = settings.with_changes(metrics_port=0)
    async with Client.connect(settings, "test") as client, running(settings, "monitor"):
        await client.wait_ready({"corral-monitor"}, timeout=90)
        port = await scraped_port(client)
        await publish_tasks(client, tenant, "m", ok=3, failed=1)
        step = StepCompleted(task_id="m-ok-0", tenant=tenant, user="u", step_id="m-ok-0-1", attempt=1,
                             agent="research", dependency="simulated/m", model="m", output="o",
                             usage=Usage(input_tokens=600, output_tokens=400), latency_ms=5.0)
        await client.bus.js.publish(subjects.step_completed(tenant), ENCODER.encode(step))
        opened = BreakerChanged(dependency="simulated/m", previous="closed", state="open", consecutive_failures=5)
        await client.bus.js.publish(subjects.breaker_state("simulated/m"), ENCODER.encode(opened))

        async def scrape():
            async with httpx.AsyncClient() as http:
                answer = await http.get(f"http://127.0.0.1:{port}/metrics")
            found = samples(answer.text)
            ready = found.get(("corral_alerts_firing", (("rule", "errors"), ("scope", "all"),
                                                        ("severity", "critical"))))
            return (answer, found) if ready and ("corral_breaker_state", (("dependency", "simulated/m"),
                                                                          ("state", "open"))) in found else None

        answer, found = await wait_until(scrape, timeout=20)
    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    minute = (("scope", "all"), ("window", "1m"))
    assert found[("corral_window_tasks", minute)] == 4
    assert found[("corral_task_error_rate", minute)] == 0.25
    assert found[("corral_tokens_per_hour", minute)] == 1000 * 60
    assert 0.9 < found[("corral_task_latency_seconds", (("quantile", "0.95"), *minute))] < 60
    assert found[("corral_events_total", (("kind", "task.completed"),))] == 3
    assert found[("corral_cost_usd_total", ())] == pytest.approx(1.0)
    assert found[("corral_breaker_state", (("dependency", "simulated/m"), ("state", "open")))] == 1
    assert found[("corral_breaker_state", (("dependency", "simulated/m"), ("state", "closed")))] == 0
    assert ("corral_window_tasks", ((("scope", f"tenant:{tenant}"), ("window", "1h")))) in found


async def test_a_request_that_is_not_a_scrape_is_refused_with_its_reason(settings):
    settings = settings.with_changes(metrics_port=0)
    async with Client.connect(settings, "test") as client, running(settings, "monitor"):
        await client.wait_ready({"corral-monitor"}, timeout=90)
        port = await scraped_port(client)

        def ask(raw: bytes) -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
                conn.sendall(raw)
                conn.shutdown(socket.SHUT_WR)
                answer = b""
                while chunk := conn.recv(65536):
                    answer += chunk
                return answer

        garbage = await anyio.to_thread.run_sync(ask, b"\x00\xffnot http at all\r\n\r\n")
        oversized = await anyio.to_thread.run_sync(ask, b"GET /metrics HTTP/1.1\r\nx: " + b"a" * 20_000 + b"\r\n\r\n")
        elsewhere = await anyio.to_thread.run_sync(ask, b"GET /admin HTTP/1.1\r\n\r\n")
        posted = await anyio.to_thread.run_sync(ask, b"POST /metrics HTTP/1.1\r\n\r\n")
        cut_off = await anyio.to_thread.run_sync(ask, b"GET /metr")
        still = await anyio.to_thread.run_sync(ask, b"GET /metrics HTTP/1.1\r\n\r\n")
    assert garbage.startswith(b"HTTP/1.1 400") and b"request line" in garbage
    assert oversized.startswith(b"HTTP/1.1 400") and b"too large" in oversized
    assert elsewhere.startswith(b"HTTP/1.1 404")
    assert posted.startswith(b"HTTP/1.1 405")
    assert cut_off.startswith(b"HTTP/1.1 400")
    assert still.startswith(b"HTTP/1.1 200") and b"corral_cost_usd_total" in still


def test_the_grafana_dashboard_queries_only_metrics_the_monitor_exports():
    import json
    import re
    from pathlib import Path

    from contracts import TaskCompleted
    from contracts.events import Alert
    from services.monitor.export import render
    from services.monitor.handlers import Breaker, Metrics

    metrics = Metrics(lambda: Policy())
    metrics.fold(TaskCompleted(task_id="t", tenant="t", user="u", output="o", attempts=1, model="m",
                               usage=Usage(input_tokens=1, output_tokens=1)), metrics.clock())
    metrics.breakers["simulated/m"] = Breaker()
    metrics.queue_depth["guard"] = 1
    firing = [Alert(rule="r", severity="high", scope="all", figure="error_rate", value=1, threshold=0)]
    exported = {family.name for family in text_string_to_metric_families(render(metrics, firing,
                                                                                metrics.clock()).decode())}
    dashboard = json.loads((Path(__file__).parent.parent / "docs" / "grafana-dashboard.json").read_text())
    queried = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"\b(corral_[a-z_]+)", target["expr"])}
    parsed_names = exported | {f"{name}_total" for name in exported}
    assert queried and queried <= parsed_names, queried - parsed_names
