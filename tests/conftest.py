"""Fixtures: a real nats-server per test (free port, temporary store) and the services on it.

Services run either in-process (their `run()` in this test's event loop: fast,
still a real server and real consumers) or as OS processes (for kill tests and
tracing, exactly as `corral up` runs them).

The server lets in only the identities `corral auth init` makes, each with its permissions, and
every service signs in as its own: every test that runs a service proves its permission table.
The tests' own client (`settings`) signs in as an unrestricted harness identity, so a test may
stand in for any service; `corral auth init` never makes one.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import anyio
import pytest

from services import auth, registry
from services.client import Client
from services.stack import Services, nats_server
from contracts.policy import Policy
from shared.bus import Bus
from shared.config import Settings
from shared.policy import apply_policy


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


TENANTS = ("default", "acme", "globex")
HARNESS = "harness.nk"


@pytest.fixture
def auth_dir(tmp_path: Path) -> Path:
    """What `corral auth init` makes for the test's tenants, with the harness identity's seed beside it."""
    directory = tmp_path / "nats" / auth.AUTH_DIR
    auth.init(directory, TENANTS)
    auth.write_seed(directory.parent / HARNESS)
    write_test_config(directory)
    return directory


def write_test_config(directory: Path) -> None:
    """The server's configuration for the identities in `directory`, and the unrestricted harness."""
    harness = directory.parent / HARNESS
    users = [(identity, auth.permissions(identity.name)) for identity in auth.identities(directory)]
    unrestricted = auth.Identity(name="harness", public_key=auth.public_key(harness), credential=harness)
    auth.write_server_config(directory, [*users, (unrestricted, None)])


VIOLATIONS = re.compile(r"^.* - (?:Publish|Subscription) Violation - .*$", re.M)


@pytest.fixture
def nats_url(request: pytest.FixtureRequest, tmp_path: Path, auth_dir: Path) -> Iterator[str]:
    """The test's server. Afterwards, the server must have refused no publish or subscription, unless the test
    is marked `refused` (it tries them on purpose): a service that did had a hole in its permissions."""
    with nats_server(tmp_path / "nats", config=auth_dir / auth.SERVER_CONFIG) as url:
        yield url
    if request.node.get_closest_marker("refused") is None:
        refused = VIOLATIONS.findall((tmp_path / "nats" / "logs" / "nats-server.log").read_text())
        assert not refused, f"the server refused {len(refused)} publish or subscription: {refused[:5]}"


@pytest.fixture
def settings(nats_url: str, auth_dir: Path) -> Settings:
    return Settings(nats_url=nats_url, nats_credentials=str(auth_dir.parent / HARNESS), sim_latency_s=0.0,
                    ack_wait_s=2.0)


def auth_dir_of(settings: Settings) -> Path:
    """The identities beside the harness credential `settings` signs in with."""
    return Path(settings.nats_credentials).parent / auth.AUTH_DIR


def signed_in_as(settings: Settings, identity: str) -> Settings:
    """`settings`, signing in as `identity` (a service kind, `operator`, `tenant-<name>`)."""
    return settings.with_changes(nats_credentials=str(auth.credential(auth_dir_of(settings), identity)))


def services(settings: Settings, log_dir: Path, **options) -> Services:
    """Service processes on the test's server, each signing in as its own identity."""
    return Services(settings.nats_url, log_dir, auth_dir=auth_dir_of(settings), **options)


def operator_env(settings: Settings) -> dict[str, str]:
    """The environment a `corral` command needs to sign in as the operator."""
    return {"CORRAL_NATS_CREDENTIALS": str(auth.credential(auth_dir_of(settings), auth.OPERATOR))}


@pytest.fixture
def tenant() -> str:
    return "default"


@pytest.fixture
def user() -> str:
    """A user no other test uses, so budgets and subjects never collide."""
    return f"u-{uuid.uuid4().hex[:10]}"


async def apply(settings: Settings, policy: Policy) -> int:
    """Make `policy` the current version, as `corral policy apply` does; returns the version."""
    async with Bus.connect(settings, "test-policy") as bus:
        return await apply_policy(await bus.policy_bucket(), policy)


class Clock:
    """A service's clock, moved by the test."""

    def __init__(self, now) -> None:
        self.now = now

    def __call__(self):
        return self.now


def mid_window_clock(start: datetime = datetime(2026, 11, 27, 12, 30, tzinfo=UTC)) -> Callable[[], datetime]:
    """Real time's passing, from half past noon of a fixed day: a budget's hour and day do not end while a
    test runs, as the real ones may (a test begun at 13:59:59 would see its hourly window reset)."""
    began = time.monotonic()
    return lambda: start + timedelta(seconds=time.monotonic() - began)


@asynccontextmanager
async def running(settings: Settings, *names: str, policy: Policy | None = None,
                  clocks: dict[str, Callable] | None = None) -> AsyncIterator[None]:
    """Run the named services (e.g. "guard", "worker:research") in this event loop. `clocks`: by service name,
    the clock given to one that takes it (the guard's gives unix seconds, the budget's an aware datetime);
    the budget's is a `mid_window_clock()` unless another is given."""
    if policy is not None:
        await apply(settings, policy)
    clocks = {"budget": mid_window_clock(), **(clocks or {})}
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        for name in names:
            service, _, agent = name.partition(":")
            label, main = registry.resolve(service, agent or None)
            main = partial(main, clock=clocks[service]) if service in clocks else main
            tg.start_soon(main, signed_in_as(settings, auth.identity_for(label)), stop)
        try:
            yield
        finally:
            stop.set()


ALL_SERVICES = ("guard", "budget", "executor", "breaker", "monitor", "approvals", "worker:research",
                "worker:coding", "worker:writing")


@asynccontextmanager
async def stack(settings: Settings, *names: str, policy: Policy | None = None,
                clocks: dict[str, Callable] | None = None) -> AsyncIterator[Client]:
    """Every service (or the named ones) in-process, plus a client that waits until they answer pings."""
    names = names or ALL_SERVICES
    async with running(settings, *names, policy=policy, clocks=clocks), Client.connect(settings, "test") as client:
        labels = {f"corral-{registry.resolve(n.partition(':')[0], n.partition(':')[2] or None)[0]}" for n in names}
        await client.wait_ready(labels, timeout=90)
        yield client


async def wait_until(probe, timeout: float = 10.0, every: float = 0.05):
    """Poll the async `probe` until it returns a truthy value; return that value or fail at `timeout`."""
    with anyio.fail_after(timeout):
        while not (result := await probe()):
            await anyio.sleep(every)
    return result
