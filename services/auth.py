"""Identities and permissions: who may connect to NATS, and what each may publish and subscribe.

Every service kind, the operator's tools and each tenant's publishers sign in with an nkey of
their own. `init()` makes the missing ones, each seed in a file of its own (mode 0600) under the
auth directory (`<data dir>/auth/`), and writes beside them the nats-server configuration that
names every public key with its permissions (`PERMISSIONS`, built from contracts/subjects.py).
nats-server enforces them: a publish or subscription outside them is refused with a permissions
violation, and the message goes nowhere.

    services    their own events and buckets, JetStream's API, replies (`_INBOX.>`), `$SRV.>`
    operator    submissions, the policy bucket, the services' endpoints, JetStream's API; reads every event
    tenant-<t>  publishes `corral.task.submitted.<t>` only; hears only t's outcomes, progress and cost
                notices, and replies under its own inbox prefix `_INBOX_<t>`

A credential is revoked by deleting its identity (`revoke()`) and reloading the server; the next
`init()` makes a new one for a service or the operator (a rotation), never for a tenant not asked for.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import msgspec
import nacl.signing
import nkeys
from rich.table import Table

from contracts import subjects as s
from services.monitor.service import STEP_SUBJECTS, TASK_SUBJECTS
from shared.config import Settings
from shared.errors import CorralError

AUTH_DIR = "auth"
"""The auth directory's name inside a data dir."""
SERVER_CONFIG = "nats-server.conf"
SEED_SUFFIX = ".nk"
OPERATOR = "operator"
WORKER = "worker"
TENANT_PREFIX = "tenant-"
REVIEWER_PREFIX = "reviewer-"
SERVICE_IDENTITIES = ("guard", "budget", "executor", "breaker", "monitor", "approvals", WORKER)
DEFAULT_TENANTS = ("default",)
"""Tenants `corral up` makes a credential for when it makes the auth directory."""
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class UnknownIdentity(CorralError):
    """No such identity: a service kind, `operator` or `tenant-<name>`."""


class Permissions(msgspec.Struct, frozen=True, kw_only=True):
    """Subjects an identity may publish to and subscribe to (NATS wildcards allowed)."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]


class Identity(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    public_key: str
    credential: Path
    """Its seed file."""


def _service(name: str, publish: Sequence[str] = (), subscribe: Sequence[str] = ()) -> Permissions:
    """A service: its own subjects, plus what every service needs. JetStream's API (streams, consumers,
    fetches, bucket reads and watches) and its replies, acks and flow control; replies to requests
    (`_INBOX.>`: answers to PING, to its endpoints, to probe leases); its dead letters and stats endpoint."""
    return Permissions(
        publish=(*publish, s.dead_letter(name), s.JS_API, s.JS_ACKS, s.JS_FLOW_CONTROL, s.ALL_INBOXES),
        subscribe=(*subscribe, s.service_stats(name), s.SERVICES_API, s.ALL_INBOXES),
    )


PERMISSIONS: dict[str, Permissions] = {
    "guard": _service("guard", publish=(s.ALL_VALIDATED, s.ALL_REJECTED, s.kv_writes(s.KV_RATES),
                                          s.kv_writes(s.KV_SUBMISSIONS))),
    "budget": _service("budget", publish=(s.ALL_ADMITTED, s.ALL_REJECTED, s.ALL_COST, s.kv_writes(s.KV_BUDGET)),
                       subscribe=(s.BUDGET_SHOW, s.BUDGET_COST, s.BUDGET_EXTEND)),
    "executor": _service("executor", publish=(s.ALL_STEP_REQUESTED, s.ALL_COMPLETED, s.ALL_FAILED, s.ALL_PROGRESS,
                                              s.BREAKER_PROBE, s.BUDGET_EXTEND, s.kv_writes(s.KV_TASKS),
                                              s.kv_writes(s.KV_CACHE), s.kv_writes(s.KV_SLOTS),
                                              s.kv_writes(s.KV_BOARDS), s.approval_requested("*")),
                         subscribe=(s.EXECUTOR_TASK,)),
    "breaker": _service("breaker", publish=(s.ALL_BREAKER, s.kv_writes(s.KV_BREAKERS)),
                        subscribe=(s.BREAKER_PROBE, s.BREAKER_CONTROL)),
    "approvals": _service("approvals", publish=(s.approval_decided("*"), s.approval_reminder("*"),
                                                s.kv_writes(s.KV_APPROVALS)),
                          subscribe=(s.APPROVALS_LIST, s.APPROVALS_SHOW, s.APPROVALS_HISTORY, s.APPROVALS_DECIDE_ANY)),
    "monitor": _service("monitor", publish=(s.kv_writes(s.KV_MONITOR), s.ALL_ALERTS, s.POLICY_ROLLED_BACK,
                                            s.kv_writes(s.KV_POLICY),  # the policy: automated rollback
                                            s.ALL_SCALE_ADVICE),
                        subscribe=(*TASK_SUBJECTS, *STEP_SUBJECTS, s.ALL_BREAKER, s.MONITOR_STATUS,
                                   s.MONITOR_ALERTS, s.MONITOR_SILENCE)),
    # One identity for every agent kind, so a new kind needs no new credential. Its dead letters and stats
    # endpoint are named after the agent (`worker-research`), one token a wildcard cannot split: any worker's.
    # Pool members also claim and answer subtasks on boards (reserving more for a part that needs it), and the one
    # that ends a distributed task says so.
    WORKER: _service("*", publish=(s.ALL_STEP_COMPLETED, s.ALL_STEP_FAILED, s.ALL_PROGRESS, s.BREAKER_PROBE,
                                   s.kv_writes(s.KV_BOARDS), s.kv_writes(s.KV_SLOTS), s.ALL_COMPLETED, s.ALL_FAILED,
                                   s.BUDGET_EXTEND, s.kv_writes(s.KV_RESPONSES),
                                   s.kv_writes(s.KV_APPROVED_CALLS)),
                     subscribe=(s.SIM_CONTROL,)),
    OPERATOR: Permissions(
        publish=(s.task_submitted("*"), s.kv_writes(s.KV_POLICY), s.MONITOR_STATUS, s.EXECUTOR_TASK, s.BUDGET_SHOW,
                 s.BUDGET_COST, s.BREAKER_CONTROL, s.SIM_CONTROL, s.ALL_STATS, s.SERVICES_API, s.JS_API,
                 s.JS_FLOW_CONTROL, s.MONITOR_ALERTS, s.MONITOR_SILENCE, s.APPROVALS_LIST, s.APPROVALS_SHOW,
                 s.APPROVALS_HISTORY, s.approvals_decide(OPERATOR)),
        subscribe=(s.ALL_TASK_EVENTS, s.ALL_STEP_EVENTS, s.ALL_BREAKER, s.ALL_COST, s.ALL_DEAD_LETTERS,
                   s.ALL_INBOXES, s.ALL_ALERTS, s.POLICY_ROLLED_BACK, s.ALL_SCALE_ADVICE, s.ALL_APPROVAL_EVENTS),
    ),
}


def tenant_permissions(tenant: str) -> Permissions:
    """A tenant's publishers: submit its tasks, hear their ends, progress and cost notices. Nothing else: no
    internal subject, no JetStream API (no stream or bucket to read), no other tenant's events."""
    return Permissions(
        publish=(s.task_submitted(tenant),),
        subscribe=(s.task_rejected(tenant), s.task_completed(tenant), s.task_failed(tenant), s.tenant_progress(tenant),
                   s.tenant_cost_notices(tenant), f"{s.tenant_inbox(tenant)}.>"),
    )


def reviewer_permissions(reviewer: str) -> Permissions:
    """A reviewer of approvals: list, show and read their history, decide on its own subject only (which is how
    the approvals service knows who decided), hear replies under its own inbox prefix. Nothing else."""
    return Permissions(
        publish=(s.APPROVALS_LIST, s.APPROVALS_SHOW, s.APPROVALS_HISTORY, s.approvals_decide(reviewer)),
        subscribe=(f"{s.reviewer_inbox(reviewer)}.>",),
    )


def permissions(identity: str) -> Permissions:
    if identity.startswith(TENANT_PREFIX):
        return tenant_permissions(identity.removeprefix(TENANT_PREFIX))
    if identity.startswith(REVIEWER_PREFIX):
        return reviewer_permissions(identity.removeprefix(REVIEWER_PREFIX))
    try:
        return PERMISSIONS[identity]
    except KeyError:
        raise UnknownIdentity(f"no identity {identity!r}; choose one of: {', '.join(PERMISSIONS)}, "
                              f"{TENANT_PREFIX}<tenant> or {REVIEWER_PREFIX}<id>") from None


def tenant_identity(tenant: str) -> str:
    if not _NAME.match(tenant):
        raise UnknownIdentity(f"tenant {tenant!r} is not a valid name: 1 to 64 letters, digits, - or _")
    return f"{TENANT_PREFIX}{tenant}"


def reviewer_identity(reviewer: str) -> str:
    if not _NAME.match(reviewer):
        raise UnknownIdentity(f"reviewer {reviewer!r} is not a valid name: 1 to 64 letters, digits, - or _")
    return f"{REVIEWER_PREFIX}{reviewer}"


def reviewer_of(credential_file: str) -> str:
    """The reviewer id an identity decides as: `reviewer-<id>`'s id; the operator's (or no credential) `operator`."""
    name = Path(credential_file).name.removesuffix(SEED_SUFFIX) if credential_file else OPERATOR
    return name.removeprefix(REVIEWER_PREFIX) if name.startswith(REVIEWER_PREFIX) else OPERATOR


def identity_for(service: str) -> str:
    """The identity a service process signs in as: its kind (every `worker-<agent>` is `worker`)."""
    return WORKER if service.startswith(f"{WORKER}-") else service


def auth_dir(data_dir: Path) -> Path:
    return data_dir / AUTH_DIR


def credential(directory: Path, identity: str) -> Path:
    return directory / f"{identity}{SEED_SUFFIX}"


def identities(directory: Path) -> list[Identity]:
    """Every identity with a seed in `directory`, services first, then the operator, then tenants."""
    order = {name: n for n, name in enumerate((*SERVICE_IDENTITIES, OPERATOR))}
    found = []
    for path in directory.glob(f"*{SEED_SUFFIX}"):
        name = path.name.removesuffix(SEED_SUFFIX)
        permissions(name)  # a file that names no identity is not ours to serve
        found.append(Identity(name=name, public_key=public_key(path), credential=path))
    return sorted(found, key=lambda i: (order.get(i.name, len(order)), i.name))


def public_key(seed_file: Path) -> str:
    try:
        pair = nkeys.from_seed(bytearray(seed_file.read_bytes().strip()))
    except (OSError, nkeys.NkeysError) as exc:
        raise CorralError(f"cannot read the nkey seed in {seed_file}: {exc!r}") from exc
    try:
        return pair.public_key.decode()
    finally:
        pair.wipe()


def init(directory: Path, tenants: Iterable[str] = (), reviewers: Iterable[str] = ()) -> list[Identity]:
    """Make the identities missing from `directory` (every service kind, the operator, one per tenant and per
    reviewer named), keep the ones there, and write the server configuration for all of them. Returns them all."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    for name in (*SERVICE_IDENTITIES, OPERATOR, *map(tenant_identity, tenants), *map(reviewer_identity, reviewers)):
        path = credential(directory, name)
        if not path.exists():
            write_seed(path)
    found = identities(directory)
    write_server_config(directory, [(identity, permissions(identity.name)) for identity in found])
    return found


def prepare(data_dir: Path, tenants: Iterable[str] = DEFAULT_TENANTS) -> Path:
    """The auth directory an embedded stack runs with (`corral up`, `corral demo`): made on first use, brought
    up to date (new service kinds, this version's permissions) on every start; its keys are kept."""
    directory = auth_dir(data_dir)
    init(directory, tenants)
    return directory


def signed_in(settings: Settings, directory: Path | None, identity: str = OPERATOR) -> Settings:
    """`settings` signing in as `identity` from `directory`; unchanged without one (no auth)."""
    if directory is None:
        return settings
    return settings.with_changes(nats_credentials=str(credential(directory, identity)))


def default_credential(settings: Settings, data_dir: Path, identity: str = OPERATOR) -> Settings:
    """`settings`, or when they name no credential and the data dir has one for `identity`, signing in with
    that: the operator's commands (and `corral service`) need no setting next to `corral up`."""
    path = credential(auth_dir(data_dir), identity)
    return settings if settings.nats_credentials or not path.exists() else signed_in(settings, path.parent, identity)


def revoke(directory: Path, identity: str) -> None:
    """Delete the identity's seed and rewrite the configuration without it: once the server reloads it (SIGHUP;
    `services.stack.reload_server`), that credential is refused."""
    path = credential(directory, identity)
    if not path.exists():
        raise UnknownIdentity(f"no identity {identity!r} in {directory}")
    path.unlink()
    write_server_config(directory, [(found, permissions(found.name)) for found in identities(directory)])


def write_seed(path: Path) -> None:
    """A new user nkey's seed in a new file only its owner may read."""
    seed = nkeys.encode_seed(bytes(nacl.signing.SigningKey.generate()), nkeys.PREFIX_BYTE_USER)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(seed + b"\n")


def write_server_config(directory: Path, users: Sequence[tuple[Identity, Permissions | None]]) -> Path:
    """The nats-server configuration (public keys and permissions only) for `users`; `None`: unrestricted."""
    path = directory / SERVER_CONFIG
    temporary = path.with_suffix(".tmp")
    temporary.write_text(render_server_config(users))
    temporary.replace(path)  # a reload never reads half a file
    return path


def render_server_config(users: Sequence[tuple[Identity, Permissions | None]]) -> str:
    lines = ["# Who may connect to NATS, and what each may publish and subscribe: written by `corral auth init`,",
             "# which regenerates it (edits here are lost). Public keys only: each seed is in a file beside this.",
             "authorization {", "  users = ["]
    for identity, granted in users:
        lines.append(f"    # {identity.name}")
        entry = f'    {{nkey: "{identity.public_key}"'
        if granted is not None:
            entry += (f", permissions: {{publish: {{allow: {_list(granted.publish)}}}, "
                      f"subscribe: {{allow: {_list(granted.subscribe)}}}}}")
        lines.append(entry + "}")
    lines += ["  ]", "}", ""]
    return "\n".join(lines)


def _list(subjects: Iterable[str]) -> str:
    return "[" + ", ".join(f'"{subject}"' for subject in subjects) + "]"


def sign_in_note(directory: Path) -> str:
    """Where an embedded stack's users find their credentials."""
    tenants = [i for i in identities(directory) if i.name.startswith(TENANT_PREFIX)]
    example = tenants[0].credential if tenants else credential(directory, tenant_identity("NAME"))
    return (f"  auth on: each service signs in with its own key from {directory}; `corral` commands with "
            f"{credential(directory, OPERATOR)}\n  (found there by default for the data dir ./.data; else set "
            f"CORRAL_NATS_CREDENTIALS). Tenants' publishers sign in with theirs,\n  e.g. {example} (an nkey seed; "
            f"inbox prefix {s.tenant_inbox('<tenant>')}); add one: corral auth init --tenant NAME")


def table(found: Sequence[Identity], title: str = "Corral identities") -> Table:
    """Each identity, its credential file, and what it may publish and subscribe to."""
    out = Table(title=title, show_lines=True)
    for column in ("identity", "credential (nkey seed)", "may publish", "may subscribe"):
        out.add_column(column)
    for identity in found:
        granted = permissions(identity.name)
        out.add_row(identity.name, str(identity.credential), "\n".join(granted.publish), "\n".join(granted.subscribe))
    return out
