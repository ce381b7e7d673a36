"""The policy bucket: apply, read, list and roll back versions; watch the current one.

The policy is the one piece of state written by operators' tooling (`corral
policy …`) rather than by a service. Each apply is a new revision of the key
`current` in the `corral_policy` bucket; the revision number is the version.
"""

from __future__ import annotations

import logging
import time
import tomllib
from pathlib import Path

import anyio
import msgspec
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from contracts.policy import DEFAULT_POLICY, Policy
from shared.errors import CorralError
from shared.kv import follow_bucket

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
    return entry.revision or 0, _decode(entry.value)


async def policy_versions(kv: KeyValue) -> list[tuple[int, Policy]]:
    try:
        entries = await kv.history(KEY)
    except KeyNotFoundError:
        return []
    return [(e.revision or 0, _decode(e.value)) for e in entries if e.value]


async def rollback(kv: KeyValue, to_version: int | None = None) -> int:
    """Make an earlier version current again (as a new version); default: the one before."""
    versions = await policy_versions(kv)
    if to_version is None:
        if len(versions) < 2:
            raise PolicyError("no earlier policy version to roll back to")
        to_version = versions[-2][0]
    _, policy = await read_policy(kv, to_version)
    return await apply_policy(kv, policy)


class PolicyView:
    """The current policy as this process knows it; callable, so handlers take `policy()`."""

    def __init__(self, policy: Policy = DEFAULT_POLICY, version: int = 0) -> None:
        self.policy = policy
        self.version = version
        self.switched_at = 0.0
        """Unix time this process switched to `version` (0: the version it started with)."""
        self.changed = anyio.Event()  # set on each switch; tests and CLIs wait on it

    @classmethod
    async def load(cls, kv: KeyValue) -> PolicyView:
        """A view at the current version; run `follow` in a task group to keep it current."""
        return cls(*reversed(await read_policy(kv)))

    def __call__(self) -> Policy:
        return self.policy

    def switch(self, version: int, policy: Policy) -> None:
        self.policy, self.version, self.switched_at = policy, version, time.time()
        self.changed.set()
        self.changed = anyio.Event()
        log.info("policy version %d in effect", version)

    async def follow(self, kv: KeyValue, stop: anyio.Event) -> None:
        await follow_bucket(kv, self._apply, stop, keys=KEY)

    def _apply(self, key: str, value: bytes | None, revision: int) -> None:
        if value is None:  # the policy was deleted: the built-in defaults apply
            self.switch(revision, DEFAULT_POLICY)
            return
        try:
            self.switch(revision, _decode(value))
        except msgspec.ValidationError as exc:  # keep the last good one; apply validates first
            log.error("policy version %s is invalid, keeping %d: %s", revision, self.version, exc)
