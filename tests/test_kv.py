"""TypedBucket on a real nats-server: compare-and-set, group commit of one process's updates."""

from __future__ import annotations

import anyio
import msgspec
import pytest
from nats.js.api import StreamConfig

from shared.bus import Bus
from shared.kv import TypedBucket

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


class Counter(msgspec.Struct):
    count: int = 0
    seen: list[int] = []


def add(counter: Counter, n: int) -> int:
    counter.count += 1
    counter.seen.append(n)
    return counter.count


def refuse(counter: Counter) -> None:
    counter.count += 1000  # half-done, then it fails: must not be written
    raise ValueError("refused")


@pytest.mark.parametrize("reuse_written", [False, True])
async def test_concurrent_updates_of_one_key_are_written_together_and_none_is_lost(settings, reuse_written):
    async with Bus.connect(settings, "test-kv") as bus:
        kv = await bus.bucket("test_group_commit")
        one, other = (TypedBucket(kv, Counter, Counter, reuse_written=reuse_written) for _ in range(2))  # "replicas"
        results: list[int] = []

        async def bump(bucket: TypedBucket[Counter], n: int) -> None:
            results.append(await bucket.update("k", lambda c: add(c, n)))

        async with anyio.create_task_group() as tg:
            for n in range(200):
                tg.start_soon(bump, one if n % 2 else other, n)
        with pytest.raises(ValueError, match="refused"):
            await one.update("k", refuse)
        final = await one.get("k")
        writes = (await kv.get("k")).revision
    assert final.count == 200 and sorted(final.seen) == list(range(200))
    assert sorted(results) == list(range(1, 201))  # each caller got the count its own change made
    assert writes < 100  # far fewer writes than updates: batches, not one CAS each


def bump_keeping(kept: list[Counter], *, give_back: bool = False):
    """A change that bumps the counter and keeps the object it was given; it may return that object."""
    def change(counter: Counter) -> Counter | None:
        kept.append(counter)
        counter.count += 1
        return counter if give_back else None
    return change


async def test_with_reuse_an_update_starts_from_the_object_last_written_unless_a_caller_got_it_back(settings):
    async with Bus.connect(settings, "test-kv") as bus:
        kv = await bus.bucket("test_reuse")
        bucket, kept = TypedBucket(kv, Counter, Counter, reuse_written=True), []
        await bucket.update("k", bump_keeping(kept))
        await bucket.update("k", bump_keeping(kept))
        returned = await bucket.update("k", bump_keeping(kept, give_back=True))
        await bucket.update("k", bump_keeping(kept))
        await TypedBucket(kv, Counter, Counter).update("k", lambda c: add(c, 0))  # another replica writes
        await bucket.update("k", bump_keeping(kept))
        final = await bucket.get("k")
    assert kept[1] is kept[0] and kept[2] is kept[0]  # no decoding between this process's own writes
    assert returned is kept[2] and kept[3] is not returned  # a value a caller holds is not changed under it
    assert kept[-1].count == 6 and final.count == 6  # the other replica's write was read, not overwritten


async def test_a_key_written_with_a_time_to_live_goes_after_it_and_one_written_without_stays(settings):
    async with Bus.connect(settings, "test-kv") as bus:
        kv = await bus.bucket("test_expiry")
        lasting = TypedBucket(kv, Counter, Counter)
        short_lived = TypedBucket(kv, Counter, Counter, expires=lambda counter: 1.0 if counter.count else None)
        await lasting.update("kept", lambda c: add(c, 1))
        await short_lived.create("made", Counter(count=1))
        await short_lived.update("updated", lambda c: add(c, 1))
        stored = await bus.js.get_msg("KV_test_expiry", subject="$KV.test_expiry.updated", direct=True)
        assert stored.headers["Nats-TTL"] == "1"
        with anyio.fail_after(10):
            while await short_lived.get("made") is not None or await short_lived.get("updated") is not None:
                await anyio.sleep(0.2)
        assert (await lasting.get("kept")).count == 1


async def test_a_bucket_made_without_per_message_ttl_gets_it_when_a_service_declares_it(settings):
    async with Bus.connect(settings, "test-kv") as bus:
        await bus.js.add_stream(StreamConfig(name="KV_test_made_elsewhere", subjects=["$KV.test_made_elsewhere.>"],
                                             max_msgs_per_subject=1, allow_direct=True))
        kv = await bus.bucket("test_made_elsewhere")
        records = TypedBucket(kv, Counter, Counter, expires=lambda _: 60.0)
        await records.update("k", lambda c: add(c, 1))
        info, stored = await bus.js.stream_info("KV_test_made_elsewhere"), await records.get("k")
    assert info.config.allow_msg_ttl and stored.count == 1
