"""What Corral keeps in JetStream: streams, durable consumers and KV buckets.

Declared idempotently by every process at start, so services can start in any
order and a restarted one finds its consumers where it left them.
"""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, NotFoundError

from contracts import subjects as s
from shared.config import Settings

DAY = 24 * 3600.0
EVENTS_MAX_AGE_S = 7 * DAY
"""How long the ingress, task and step streams keep an event, so the longest after its publication a
consumer can get it (again). Records that make a redelivery harmless must outlive it."""
INGRESS_DEDUP_WINDOW_S = 0.1
"""The ingress stream's duplicate window: the least nats-server accepts (it refuses below 100 ms, and has no
way to turn de-duplication off). A publisher chooses its `Nats-Msg-Id`, so a window would let one tenant's
id drop another's message: submissions are de-duplicated by the guard instead, per (tenant, task id)."""


def stream_configs(settings: Settings) -> list[StreamConfig]:
    """In declaration order: CORRAL_TASKS gives up the ingress subjects (it held `corral.task.>` before)
    before CORRAL_INGRESS takes them, since two streams' subjects may not overlap."""
    common = dict(
        storage=StorageType.FILE,
        retention=RetentionPolicy.LIMITS,
        num_replicas=settings.stream_replicas,
        duplicate_window=settings.dedup_window_s,
    )
    ingress = {**common, "duplicate_window": INGRESS_DEDUP_WINDOW_S}
    return [
        StreamConfig(name=s.STREAM_TASKS, subjects=list(s.INTERNAL_TASK_EVENTS), max_age=EVENTS_MAX_AGE_S,
                     **common),
        StreamConfig(name=s.STREAM_INGRESS, subjects=[s.ALL_SUBMITTED], max_age=EVENTS_MAX_AGE_S, **ingress),
        StreamConfig(name=s.STREAM_STEPS, subjects=[s.ALL_STEP_EVENTS], max_age=EVENTS_MAX_AGE_S, **common),
        StreamConfig(name=s.STREAM_SIGNALS, subjects=[s.ALL_BREAKER, s.ALL_COST, s.ALL_ALERTS, s.POLICY_ROLLED_BACK], max_age=7 * DAY, **common),
        StreamConfig(name=s.STREAM_DLQ, subjects=[s.ALL_DEAD_LETTERS], max_age=30 * DAY, **common),
        # every request, decision, reminder and escalation: the approvals' audit trail
        StreamConfig(name=s.STREAM_APPROVALS, subjects=[s.ALL_APPROVAL_EVENTS], max_age=30 * DAY, **common),
    ]


def consumer_config(settings: Settings, durable: str, *filters: str, ack_wait_s: float | None = None,
                    acks: bool = True) -> ConsumerConfig:
    """A durable pull consumer shared by every replica of a service. Explicit acks, unless
    `acks=False`: for observers (the monitor) that may miss an event in a crash but must
    not cost the server an ack round trip per event."""
    return ConsumerConfig(
        durable_name=durable,
        ack_policy=AckPolicy.EXPLICIT if acks else AckPolicy.NONE,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=ack_wait_s or settings.ack_wait_s,
        max_deliver=settings.max_deliver,
        max_ack_pending=10_000,
        filter_subjects=list(filters),
        num_replicas=settings.stream_replicas,
    )


async def declare_streams(js: JetStreamContext, settings: Settings) -> None:
    for config in stream_configs(settings):
        try:
            await js.add_stream(config)
        except BadRequestError:
            # Exists with other settings (e.g. an older version): bring it up to date.
            await js.update_stream(config)


async def declare_consumer(js: JetStreamContext, stream: str, config: ConsumerConfig) -> None:
    # The server creates the durable, or updates the fields that may change (ack wait,
    # max deliver, filters). It refuses other changes; we never delete a durable to force
    # one, since a new durable would replay the whole stream.
    await js.add_consumer(stream, config)


async def declare_bucket(js: JetStreamContext, settings: Settings, bucket: str, *, history: int = 1,
                         ttl_s: float | None = None):
    """The bucket, created if missing; `ttl_s`: entries expire that many seconds after their last write.
    An existing bucket made without per-message TTL (by another tool) gets it: records of finished work
    are written with one (shared/kv.py)."""
    try:
        return await _existing(js, bucket)
    except NotFoundError:
        pass
    try:
        return await js.create_key_value(
            KeyValueConfig(bucket=bucket, history=history, storage=StorageType.FILE, replicas=settings.stream_replicas,
                           ttl=ttl_s, direct=True)  # reads skip the JetStream API queue
        )
    except BadRequestError:  # another process made it at the same moment (and may have turned TTLs on since)
        return await _existing(js, bucket)


async def _existing(js: JetStreamContext, bucket: str):
    """The bucket as it is, with per-message TTL turned on if it was not (the server allows that, never the
    reverse); NotFoundError if there is none."""
    kv = await js.key_value(bucket)
    info = await js.stream_info(f"KV_{bucket}")
    if not info.config.allow_msg_ttl:
        info.config.allow_msg_ttl = True
        await js.update_stream(info.config)
    return kv
