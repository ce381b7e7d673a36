"""`corral demo`, end to end in a short form, exactly as `make run` runs it (processes and all): with auth on,
every service signing in as its own identity and the demo's driver as the operator."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_the_demo_runs_every_path_end_to_end_shows_a_breaker_trip_and_recovery_and_loses_no_task(tmp_path):
    argv = [sys.executable, "-m", "services.cli", "demo", "--tasks", "60", "--users", "12", "--rate", "60",
            "--data-dir", str(tmp_path / "demo")]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=180, env={**os.environ, "COLUMNS": "120"})
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert re.search(r"lost \(no terminal event\)\s+│\s+0 ", out), out
    completed = int(re.search(r"│ completed\s+│\s+(\d+)", out).group(1))
    assert completed >= 40, out
    assert "rejected: unknown_agent" in out and "SIMULATED" in out
    assert int(re.search(r"breaker trips \(closed -> open\)\s+│\s+(\d+)", out).group(1)) >= 1, out
    assert int(re.search(r"breaker recoveries \(half_open -> closed\)\s+│\s+(\d+)", out).group(1)) >= 1, out
    assert int(re.search(r"of which on a fallback strategy\s+│\s+(\d+)", out).group(1)) >= 1, out
    planned = out[out.index("Multi-agent tasks"):out.index("Gated tasks")]
    for mode in ("centralized", "distributed", "hybrid"):
        assert re.search(rf"│ {mode}\s+│ the \w+\s+│ completed ", planned), out
    assert planned.count("│ completed ") == 4, out  # every mode's task, the manager's plan too
    gated = out[out.index("Gated tasks"):out.index("a REAL model")]
    for reviewer, outcome in (("approve", "completed"), ("edit", "completed"), ("deny", "was denied by"),
                              ("(no decision)", "timed out")):
        assert re.search(rf"│ {re.escape(reviewer)}\s+│ [^│]*{outcome}", gated), out
    real = out[out.index("a REAL model"):]
    assert real.count("completed") == 3, out  # the local model answered each of its three tasks
    assert (tmp_path / "demo" / "auth" / "nats-server.conf").exists()  # auth was on, with no step of its own
    server_log = (tmp_path / "demo" / "logs" / "nats-server.log").read_text()
    assert "Violation" not in server_log, "the server refused a publish or subscription of the demo's"

