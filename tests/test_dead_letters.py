"""Bad input is refused with a reason and kept; it never blocks a consumer."""

from __future__ import annotations

import msgspec
import pytest
from nats.js.errors import NotFoundError

from contracts import DeadLetter, TaskCompleted, TaskSpec, subjects
from tests.conftest import stack, wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


async def _last_dead_letter(js, service: str) -> DeadLetter | None:
    try:
        raw = await js.get_last_msg(subjects.STREAM_DLQ, subjects.dead_letter(service))
    except NotFoundError:
        return None
    return msgspec.json.decode(raw.data, type=DeadLetter)


async def test_an_undecodable_message_is_dead_lettered_with_its_reason_and_the_consumer_keeps_flowing(
        settings, tenant, user):
    async with stack(settings) as client:
        js = client.bus.js
        await js.publish(subjects.task_submitted(tenant), b"{not json at all")
        letter = await wait_until(lambda: _last_dead_letter(js, "guard"))
        end = await client.run(TaskSpec(agent="research", prompt="still flowing?"), tenant=tenant, user=user)
    assert letter.payload == b"{not json at all"
    assert letter.subject == subjects.task_submitted(tenant)
    assert letter.reason.startswith("undecodable: ")
    assert isinstance(end, TaskCompleted)


async def test_a_step_event_of_the_wrong_shape_is_dead_lettered_by_every_consumer_of_it(settings, tenant):
    async with stack(settings, "executor", "budget", "breaker") as client:
        js = client.bus.js
        await js.publish(subjects.step_completed(tenant), b'{"kind": "step.completed", "task_id": 42}')
        for service in ("executor", "budget", "breaker"):
            letter = await wait_until(lambda s=service: _last_dead_letter(js, s))
            assert "task_id" in letter.reason, letter.reason


async def test_a_submission_that_is_not_a_task_but_names_one_is_rejected_not_only_dead_lettered(settings, tenant, user):
    async with stack(settings, "guard") as client, client.events() as events:
        bad = {"kind": "task.submitted", "task_id": "t-bad-1", "tenant": tenant, "user": user, "spec": {"agent": 7}}
        await client.bus.js.publish(subjects.task_submitted(tenant), msgspec.json.encode(bad))
        async for event in events:
            if event.task_id == "t-bad-1":
                break
    assert event.reason == "invalid_request"
    assert "spec.agent" in event.message
