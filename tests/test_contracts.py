"""Contracts: the committed JSON Schemas match the code; decoding tolerates newer producers."""

from __future__ import annotations

import msgspec
import pytest

from contracts import TaskSpec, TaskSubmitted, subjects
from contracts.schema import SCHEMA_DIR, _normalised, schemas


def test_the_committed_json_schemas_match_the_contracts_in_code():
    generated = schemas()
    committed = {path.name: path.read_text() for path in SCHEMA_DIR.glob("*.json")}
    assert set(committed) == set(generated), "run `corral contracts` and commit contracts/schemas"
    for name, text in generated.items():
        assert committed[name] == text, f"{name} drifted: run `corral contracts` and commit the result"


def test_a_schema_description_reads_the_same_whether_msgspec_dedented_it_or_not():
    kept_indent = {"$defs": {"A": {"description": "First line\n    second line.\n"}}}
    dedented = {"$defs": {"A": {"description": "First line\nsecond line."}}}
    assert _normalised(kept_indent) == _normalised(dedented) == dedented


def test_an_older_consumer_reads_an_event_with_fields_it_does_not_know():
    newer = {"kind": "task.submitted", "task_id": "t1", "tenant": "acme", "user": "bob",
             "spec": {"agent": "research", "prompt": "hi", "priority": "high"}, "region": "eu"}
    event = msgspec.json.decode(msgspec.json.encode(newer), type=TaskSubmitted)
    assert event.spec.prompt == "hi"


def test_an_event_round_trips_and_names_its_kind_on_the_wire():
    event = TaskSubmitted(task_id="t1", tenant="acme", user="bob", spec=TaskSpec(agent="coding", prompt="x"))
    wire = msgspec.json.encode(event)
    assert b'"kind":"task.submitted"' in wire
    assert msgspec.json.decode(wire, type=TaskSubmitted) == event


@pytest.mark.parametrize("tenant", ["a.b", "a b", "*", ">", ""])
def test_a_tenant_that_cannot_be_a_subject_token_is_refused_at_decoding(tenant):
    bad = {"kind": "task.submitted", "task_id": "t1", "tenant": tenant, "user": "bob",
           "spec": {"agent": "research", "prompt": "hi"}}
    with pytest.raises(msgspec.ValidationError, match="tenant"):
        msgspec.json.decode(msgspec.json.encode(bad), type=TaskSubmitted)


def test_the_dedup_key_of_a_step_event_names_tenant_task_step_and_kind():
    from contracts import StepFailed

    failed = StepFailed(task_id="t1", tenant="a", user="b", step_id="t1-a2", attempt=2, agent="research",
                        dependency="simulated/sim-large", error="timeout", message="slow")
    assert failed.dedup_key() == "a.t1:t1-a2:step.failed"


def test_subjects_keep_the_tenant_as_one_token():
    assert subjects.task_submitted("acme") == "corral.task.submitted.acme"
    assert subjects.breaker_state("simulated/sim.large") == "corral.breaker.state.simulated/sim_large"


def test_the_architecture_pages_subject_table_lists_every_subject_the_code_uses():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "docs" / "architecture.md").read_text()
    patterns = [
        subjects.task_submitted("<tenant>"), subjects.task_validated("<tenant>"), subjects.task_admitted("<tenant>"),
        subjects.task_rejected("<tenant>"), f"{subjects.PREFIX}.task.progress.<tenant>.<task>",
        subjects.task_completed("<tenant>"), subjects.task_failed("<tenant>"), subjects.step_requested("<agent>"),
        subjects.step_completed("<tenant>"), subjects.step_failed("<tenant>"),
        f"{subjects.PREFIX}.breaker.state.<dependency>", subjects.dead_letter("<service>"),
        subjects.MONITOR_STATUS, subjects.EXECUTOR_TASK, subjects.BUDGET_SHOW, subjects.BUDGET_COST,
        subjects.cost_notice("<tenant>", "<user>"),
        subjects.STREAM_INGRESS, subjects.STREAM_TASKS, subjects.STREAM_STEPS, subjects.STREAM_SIGNALS,
        subjects.STREAM_DLQ, subjects.ALL_SUBMITTED,
        subjects.KV_BUDGET, subjects.KV_TASKS, subjects.KV_BREAKERS, subjects.KV_POLICY, subjects.KV_RATES,
        subjects.KV_SUBMISSIONS, f"{subjects.PREFIX}.alert.<severity>.<name>", subjects.POLICY_ROLLED_BACK,
        subjects.MONITOR_ALERTS, subjects.MONITOR_SILENCE, subjects.KV_MONITOR,
    ]
    missing = [p for p in patterns if f"`{p}`" not in readme]
    assert not missing, f"docs/architecture.md's subject table lacks {missing}"


def test_the_readme_example_task_is_a_valid_submission():
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    example = re.search(r"nats --nkey \S+ pub corral\.task\.submitted\.(\w+) \\\n\s+'(.+)'", readme)
    task = msgspec.json.decode(example.group(2), type=TaskSubmitted)
    assert task.tenant == example.group(1) and task.spec.agent == "research"


def _unbounded(node: dict, defs: dict, path: str, seen: tuple[str, ...] = ()) -> list[str]:
    """Paths of the JSON Schema `node` a publisher could fill without limit (a string with no length or
    pattern, a number with no range, a list or map with no size), or nest by recursion."""
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[1]
        if name in seen:
            return [f"{path}: recursive ({name})"]
        return _unbounded(defs[name], defs, path, (*seen, name))
    found = []
    for option in node.get("anyOf", []):
        found += _unbounded(option, defs, path, seen)
    kind = node.get("type")
    if "enum" in node or "const" in node or kind in ("boolean", "null"):
        return found
    if kind == "string" and not ({"maxLength", "pattern", "format"} & set(node)):
        found.append(f"{path}: string of any length")
    if kind in ("integer", "number") and not ({"minimum", "exclusiveMinimum"} & set(node) and "maximum" in node):
        found.append(f"{path}: number of any size")
    if kind == "array":
        found += [] if "maxItems" in node else [f"{path}: list of any length"]
        found += _unbounded(node.get("items", {}), defs, f"{path}[]", seen)
    if kind == "object":
        for name, field in node.get("properties", {}).items():
            found += _unbounded(field, defs, f"{path}.{name}", seen)
        if isinstance(node.get("additionalProperties"), dict):
            found += [] if "maxProperties" in node else [f"{path}: map of any size"]
            found += _unbounded(node["additionalProperties"], defs, f"{path}{{}}", seen)
    return found


def test_every_field_a_publisher_can_send_is_bounded_in_its_json_schema_and_nothing_nests_by_recursion():
    from contracts.commands import COMMAND_CONTRACTS
    from contracts.events import ALL_CONTRACTS
    from contracts.queries import BudgetQuery, CostQuery, TaskStatusQuery

    unbounded = []
    for contract in (*ALL_CONTRACTS, *COMMAND_CONTRACTS, BudgetQuery, CostQuery, TaskStatusQuery):
        schema = msgspec.json.schema(contract)
        unbounded += _unbounded(schema, schema.get("$defs", {}), contract.__name__)
    assert unbounded == []


@pytest.mark.parametrize(("field", "value"), [
    ("usage", {"input_tokens": -1_000_000, "output_tokens": 10}),
    ("usage", {"input_tokens": 10, "output_tokens": 10**12}),
    ("latency_ms", -5.0),
    ("dependency", "simulated/sim large"),
    ("step_id", "x" * 300),
])
def test_a_step_outcome_with_nonsense_numbers_or_names_is_refused_at_decoding(field, value):
    from contracts import StepCompleted

    step = {"kind": "step.completed", "task_id": "t1", "tenant": "acme", "user": "bob", "step_id": "acme/t1-s0a1",
            "attempt": 1, "agent": "research", "dependency": "simulated/sim-large", "model": "sim-large",
            "output": "ok", "usage": {"input_tokens": 1, "output_tokens": 1}, "latency_ms": 1.0, field: value}
    with pytest.raises(msgspec.ValidationError, match=field):
        msgspec.json.decode(msgspec.json.encode(step), type=StepCompleted)
