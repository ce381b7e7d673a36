"""The policy bucket: apply, read, list and roll back versions; watch the current one.

The policy is the one piece of state written by operators' tooling (`corral
policy …`) rather than by a service. Each apply is a new revision of the key
`current` in the `corral_policy` bucket; the revision number is the version.

A version that does not decode (not JSON, or not a valid policy for this code) is
refused by every service: it keeps the last good version (at start, the newest good
one in the history), says which version it refused in its $SRV.STATS (`policy`) and
its log, reports the value as a dead letter once, and keeps running. No service ever
writes the bucket, so the refused version stays for operators to replace or roll back.
"""

from __future__ import annotations

import logging
import time
import tomllib
from pathlib import Path

import anyio
import msgspec
from nats.js.errors import KeyNotFoundError, NoKeysError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from contracts.policy import DEFAULT_POLICY, Policy
from shared.errors import CorralError
from shared.kv import bucket_name
from shared.quarantine import Quarantine
from shared.watch import follow_bucket

log = logging.getLogger(__name__)
KEY = "current"
_decode = msgspec.json.Decoder(Policy).decode


class PolicyError(CorralError):
    """A policy file or version is invalid; the message says where."""


def load_policy_file(path: Path) -> Policy:
    try:
        raw = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise PolicyError(f"cannot read policy {path}: {exc}") from exc
    try:
        return msgspec.convert(raw, Policy)
    except msgspec.ValidationError as exc:
        raise PolicyError(f"invalid policy {path}: {exc}") from exc


async def apply_policy(kv: KeyValue, policy: Policy) -> int:
    """Store `policy` as the new current version; returns its version number."""
    return await kv.put(KEY, msgspec.json.encode(policy))


async def read_policy(kv: KeyValue, version: int | None = None) -> tuple[int, Policy]:
    """(version, policy); the defaults as version 0 when none was ever applied."""
    try:
        entry = await kv.get(KEY, revision=version)
    except KeyNotFoundError:
        if version:
            raise PolicyError(f"no policy version {version}; see `corral policy history`") from None
        return 0, DEFAULT_POLICY
    revision = entry.revision or 0
    try:
        return revision, _decode(entry.value)
    except msgspec.DecodeError as exc:
        raise PolicyError(f"policy version {revision} does not decode ({exc}); services keep the last good one: "
                          f"apply a new version or `corral policy rollback`") from None


async def policy_versions(kv: KeyValue) -> list[tuple[int, Policy]]:
    """Every kept version that decodes, oldest first (those that do not are logged and left out)."""
    return _decodable(await kept_entries(kv))


async def rollback(kv: KeyValue, to_version: int | None = None) -> int:
    """Make an earlier version current again (as a new version); default: the newest good one before the
    current version (the one before it, unless that one does not decode)."""
    if to_version is None:
        history = await kept_entries(kv)
        current = (history[-1].revision or 0) if history else 0
        earlier = [number for number, _ in _decodable(history) if number < current]
        if not earlier:
            raise PolicyError("no earlier policy version to roll back to")
        to_version = earlier[-1]
    _, policy = await read_policy(kv, to_version)
    return await apply_policy(kv, policy)


def _decodable(entries: list) -> list[tuple[int, Policy]]:
    versions = []
    for entry in entries:
        if entry.value:
            try:
                versions.append((entry.revision or 0, _decode(entry.value)))
            except msgspec.DecodeError as exc:
                log.warning("policy version %s does not decode, left out: %s", entry.revision, exc)
    return versions


HISTORY_TRIES = 3


async def kept_entries(kv: KeyValue) -> list:
    """The kept versions. nats-py's history can end before the entries it was sent arrive and say there are
    none (nats.py#842): a "none" is believed only once the key itself is not there."""
    for _ in range(HISTORY_TRIES):
        try:
            return await kv.history(KEY)
        except NoKeysError:
            try:
                await kv.get(KEY)
            except KeyNotFoundError:
                return []
    raise PolicyError(f"the policy bucket holds {KEY!r}, but its history did not arrive in {HISTORY_TRIES} tries")


class Refusal(msgspec.Struct, frozen=True):
    """A version this process refused (it does not decode), for its $SRV.STATS."""

    version: int
    reason: str
    at: float


class PolicyView:
    """The current policy as this process knows it; callable, so handlers take `policy()`."""

    def __init__(self, policy: Policy = DEFAULT_POLICY, version: int = 0, quarantine: Quarantine | None = None) -> None:
        self.policy = policy
        self.version = version
        self.since = time.time()
        """Unix seconds this process switched to `version`."""
        self.refused: Refusal | None = None
        """The newest version refused, while no newer good one came."""
        self.quarantine = quarantine or Quarantine()
        self.changed = anyio.Event()  # set on each switch; tests and CLIs wait on it

    @classmethod
    async def load(cls, kv: KeyValue, quarantine: Quarantine | None = None) -> PolicyView:
        """A view at the current version, or at the newest one before it that decodes; run `follow` in a task
        group to keep it current."""
        view = cls(quarantine=quarantine)
        for entry in reversed(await kept_entries(kv)):  # newest first
            value = None if entry.operation in (KV_DEL, KV_PURGE) else entry.value
            try:
                view.apply(entry.key, value, entry.revision or 0)
                break
            except msgspec.DecodeError as exc:
                await view.quarantine.note(bucket_name(kv), entry.key, entry.revision or 0, value or b"", exc)
        return view

    def __call__(self) -> Policy:
        return self.policy

    def switch(self, version: int, policy: Policy) -> None:
        self.policy, self.version, self.since = policy, version, time.time()
        if self.refused is not None and self.refused.version < version:
            self.refused = None
        self.changed.set()
        self.changed = anyio.Event()
        log.info("policy version %d in effect", version)

    def stats(self) -> dict[str, object]:
        """For $SRV.STATS: the version in effect, since when, and the version refused, if any."""
        refused = msgspec.structs.asdict(self.refused) if self.refused else None
        return {"version": self.version, "since": self.since, "refused": refused}

    async def follow(self, kv: KeyValue, stop: anyio.Event) -> None:
        await follow_bucket(kv, self.apply, stop, keys=KEY, quarantine=self.quarantine)

    def apply(self, key: str, value: bytes | None, revision: int) -> None:
        """Switch to this version (None: deleted, the built-in defaults apply); a version that does not
        decode is refused, and the DecodeError raised for the watch to quarantine it."""
        if value is None:
            self.switch(revision, DEFAULT_POLICY)
            return
        try:
            policy = _decode(value)
        except msgspec.DecodeError as exc:
            self._refuse(revision, exc)
            raise
        if revision != self.version:  # the watch starts with the version `load` read
            self.switch(revision, policy)

    def _refuse(self, version: int, error: Exception) -> None:
        if version <= self.version or (self.refused is not None and self.refused.version >= version):
            return  # an older version (while loading), or refused already
        self.refused = Refusal(version=version, reason=str(error), at=time.time())
        log.error("policy version %d does not decode, keeping version %d: %s", version, self.version, error)
