"""Untrusted publishers cannot break, fool or bypass Corral: on a real nats-server, each way a publisher
could send nonsense, impersonate another tenant, collide with internal ids or skew the figures, and what
Corral does instead."""

from __future__ import annotations

import msgspec
import nats
import pytest
from nats.js.api import ConsumerConfig, StorageType, StreamConfig
from nats.js.errors import NoStreamResponseError

from contracts import TaskSpec, TaskSubmitted, subjects
from shared.bus import Bus
from shared.streams import INGRESS_DEDUP_WINDOW_S
from tests.conftest import stack

pytestmark = [pytest.mark.anyio, pytest.mark.integration]
ENCODER = msgspec.json.Encoder()


# --- ingress apart from internal events ------------------------------------------------------------------


async def test_streams_declared_over_the_old_layout_move_submissions_into_their_own_stream(settings):
    old = await nats.connect(settings.nats_url)  # an older Corral's task stream, which stored submissions too
    try:
        js = old.jetstream()
        await js.add_stream(StreamConfig(name=subjects.STREAM_TASKS, subjects=["corral.task.>"],
                                         storage=StorageType.FILE, duplicate_window=120))
        await js.add_consumer(subjects.STREAM_TASKS, ConsumerConfig(durable_name=subjects.CONSUMER_GUARD,
                                                                    filter_subject="corral.task.submitted.>"))
    finally:
        await old.close()
    async with Bus.connect(settings, "test-new") as bus:  # declares the streams again, as every service does
        tasks = await bus.js.stream_info(subjects.STREAM_TASKS)
        ingress = await bus.js.stream_info(subjects.STREAM_INGRESS)
        stored = await bus.js.publish(subjects.task_submitted("acme"), b"{}")
        internal = await bus.js.publish(subjects.task_validated("acme"), b"{}")
    assert set(tasks.config.subjects) == set(subjects.INTERNAL_TASK_EVENTS)
    assert ingress.config.subjects == [subjects.ALL_SUBMITTED]
    assert ingress.config.duplicate_window == INGRESS_DEDUP_WINDOW_S
    assert (stored.stream, internal.stream) == (subjects.STREAM_INGRESS, subjects.STREAM_TASKS)


@pytest.mark.parametrize("subject", ["corral.task.submitted", "corral.task.submitted.acme.extra"])
async def test_a_task_on_an_ingress_subject_without_exactly_one_tenant_token_is_stored_by_no_stream(
        settings, subject):
    task = TaskSubmitted(task_id="t-no-tenant", tenant="acme", user="bob", spec=TaskSpec(agent="research", prompt="p"))
    async with Bus.connect(settings, "test-publisher") as bus:
        with pytest.raises(NoStreamResponseError):  # the publisher learns at once: nothing will answer it
            await bus.js.publish(subject, ENCODER.encode(task), timeout=2)
        for stream in (subjects.STREAM_INGRESS, subjects.STREAM_TASKS):
            assert (await bus.js.stream_info(stream)).state.messages == 0
