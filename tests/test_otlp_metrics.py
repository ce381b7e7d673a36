"""The monitor's OpenTelemetry metrics reach an OTLP/HTTP receiver with the GenAI semantic-convention names."""

from __future__ import annotations

import msgspec
import pytest

from contracts import StepCompleted, StepFailed, subjects
from contracts.events import Usage
from services.client import Client
from tests.conftest import running, wait_until
from tests.otlp_receiver import OtlpReceiver
from tests.test_alerts import publish_tasks

pytestmark = [pytest.mark.anyio, pytest.mark.integration]
ENCODER = msgspec.json.Encoder()


async def test_the_monitor_exports_token_usage_and_durations_by_genai_names_and_its_figures_as_corral_metrics(
        settings, tenant):
    with OtlpReceiver() as collector:
        settings = settings.with_changes(otlp_endpoint=collector.endpoint, monitor_otlp_interval_s=0.2)
        async with Client.connect(settings, "test") as client, running(settings, "monitor"):
            await client.wait_ready({"corral-monitor"}, timeout=90)
            await publish_tasks(client, tenant, "otel", ok=3, failed=1)
            step = StepCompleted(task_id="otel-ok-0", tenant=tenant, user="u", step_id="otel-ok-0-1", attempt=1,
                                 agent="research", dependency="simulated/sim-small", model="sim-small", output="o",
                                 usage=Usage(input_tokens=120, output_tokens=30), latency_ms=250.0)
            failed = StepFailed(task_id="otel-failed-0", tenant=tenant, user="u", step_id="otel-failed-0-1",
                                attempt=1, agent="research", dependency="simulated/sim-small", error="timeout",
                                message="slow", latency_ms=900.0)
            await client.bus.js.publish(subjects.step_completed(tenant), ENCODER.encode(step))
            await client.bus.js.publish(subjects.step_failed(tenant), ENCODER.encode(failed))

            async def exported():
                tokens = collector.metric("gen_ai.client.token.usage")
                durations = collector.metric("gen_ai.client.operation.duration")
                errors = [a for a, p in collector.metric("corral.task.error_rate")
                          if a.get("corral.scope") == "all" and p.as_double == 0.25]
                return (tokens, durations) if tokens and len(durations) >= 2 and errors else None

            tokens, durations = await wait_until(exported, timeout=20)
    by_type = {attributes["gen_ai.token.type"]: point.sum for attributes, point in tokens}
    assert by_type == {"input": 120, "output": 30}
    attributes = tokens[0][0]
    assert (attributes["gen_ai.request.model"], attributes["gen_ai.provider.name"],
            attributes["gen_ai.operation.name"]) == ("sim-small", "simulated", "chat")
    failures = [(a, p) for a, p in durations if a.get("error.type") == "timeout"]
    successes = [(a, p) for a, p in durations if "error.type" not in a]
    assert failures[0][1].sum == pytest.approx(0.9) and successes[0][1].sum == pytest.approx(0.25)
