"""One trace per task: every service's span arrives at an OTLP collector under one trace id."""

from __future__ import annotations

import os
import sys

import anyio
import pytest

from services.client import Client
from tests.conftest import operator_env, services, wait_until
from tests.otlp_receiver import OtlpReceiver

pytestmark = [pytest.mark.anyio, pytest.mark.integration]
EVERY_SERVICE = {"corral-cli", "corral-guard", "corral-budget", "corral-executor", "corral-worker-research",
                 "corral-breaker", "corral-monitor"}


async def test_a_task_leaves_one_trace_with_a_span_from_every_service(settings, tenant, user, tmp_path):
    with OtlpReceiver() as collector:
        env = {"CORRAL_OTLP_ENDPOINT": collector.endpoint}
        stack = services(settings, tmp_path / "logs", env=env, agents=("research",))
        stack.start()
        try:
            async with Client.connect(settings, "test") as client:
                await client.wait_ready(stack.names(), timeout=30)
            submit = [sys.executable, "-m", "services.cli", "submit", "trace me", "--agent", "research",
                      "--user", user, "--tenant", tenant, "--nats", settings.nats_url]
            done = await anyio.run_process(submit, env={**os.environ, **env, **operator_env(settings)}, check=False)
            assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
            cli_traces = {tid for tid, service, _ in collector.spans if service == "corral-cli"}
            assert len(cli_traces) == 1
            trace_id = cli_traces.pop()

            async def complete():
                return collector.services_in_trace(trace_id) >= EVERY_SERVICE

            await wait_until(complete, timeout=15)
        finally:
            stack.stop()
    spans = [name for tid, _, name in collector.spans if tid == trace_id]
    assert "corral submit" in spans
    assert any(name.startswith("worker-research") for name in spans)

