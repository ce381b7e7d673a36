"""The `approvals` group: list, show, approve, deny, edit, history (request/reply to the approvals service).

Who decides is the identity the command signs in as: `reviewer-<id>`'s credential decides as `<id>`, the
operator's as `operator`. nats-server lets an identity send decisions on its own reviewer subject only, so a
command cannot decide as anyone else.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional, TypeVar

import msgspec
import typer
from rich.markup import escape
from rich.table import Table

from contracts.approvals import (
    Approval,
    ApprovalDecided,
    ApprovalHistory,
    ApprovalReminder,
    ApprovalReply,
    ApprovalRequested,
    DecideApproval,
    ListApprovals,
    ShowApproval,
)
from services.cli.common import ConfigOption, NatsOption, console, resolve_settings, run

if TYPE_CHECKING:
    from services.client import Client

T = TypeVar("T")
app = typer.Typer(help="Human approvals of high-stakes steps: see them, decide them.", no_args_is_help=True)
IdArgument = Annotated[str, typer.Argument(help="the approval's id (corral approvals list)")]
TenantOption = Annotated[str, typer.Option("--tenant", help="the approval's tenant")]
ReasonOption = Annotated[str, typer.Option("--reason", help="why (a denial's reason is the task's error)")]
JsonOption = Annotated[bool, typer.Option("--json", help="print the reply as JSON")]


def _call(nats: str | None, config: Path | None, action: Callable[[Client, str], Awaitable[T]]) -> T:
    """Connect as the credential's identity, await ACTION(client, reviewer id), close."""
    from services import auth
    from services.client import Client

    settings = resolve_settings(nats, config)
    reviewer = auth.reviewer_of(settings.nats_credentials)

    async def go() -> T:
        as_reviewer = reviewer if reviewer != auth.OPERATOR else None
        async with Client.connect(settings, "cli", reviewer=as_reviewer) as client:
            return await action(client, reviewer)

    return run(go)


def _when(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S")


@app.command("list")
def list_(
    tenant: Annotated[Optional[str], typer.Option("--tenant", help="one tenant's (default: every tenant's)")] = None,
    every: Annotated[bool, typer.Option("--all", help="decided ones too, not only pending")] = False,
    nats: NatsOption = None,
    config: ConfigOption = None,
) -> None:
    """Approvals waiting for a decision: what would run, why, by when."""
    query = ListApprovals(tenant=tenant, status=None if every else "pending")
    reply = _call(nats, config, lambda client, _: client.approvals(query))
    table = Table(title="Approvals" if every else "Pending approvals")
    for name in ("id", "tenant", "task", "call", "rule", "group", "deadline (UTC)", "status"):
        table.add_column(name, overflow="fold")
    for approval in reply.approvals:
        request = approval.request
        call = escape(f"{request.tool} {request.arguments}")
        table.add_row(request.approval_id, request.tenant, request.task_id, call, request.rule, approval.group,
                      _when(approval.deadline_at), approval.status)
    console.print(table)


@app.command()
def show(approval_id: IdArgument, tenant: TenantOption = "default", as_json: JsonOption = False,
         nats: NatsOption = None, config: ConfigOption = None) -> None:
    """One approval: the call, its rule, the task's cost so far and estimate, who asked, its decisions."""
    reply = _call(nats, config, lambda client, _: client.approval(ShowApproval(tenant=tenant, approval_id=approval_id)))
    if as_json:
        console.print_json(msgspec.json.encode(reply).decode())
        return
    _refused_exits(reply)
    print_approval(reply.approval)


def print_approval(approval: Approval) -> None:
    request = approval.request
    usage = request.usage_so_far
    console.print(f"approval {request.approval_id} ({approval.status}) of task {request.task_id} (tenant "
                  f"{request.tenant}, user {request.user}, step {request.step_id})", soft_wrap=True, markup=False)
    what = f"{request.tool} {request.arguments}" if request.tool else f"the {request.agent} step: {request.step_input}"
    console.print(f"  would run: {what}", soft_wrap=True, markup=False)
    console.print(f"  why: {request.rule}: {request.why}", soft_wrap=True, markup=False)
    console.print(f"  so far: {usage.total} tokens, ${request.cost_so_far_usd:.6f}; estimate "
                  f"{request.estimate_tokens} tokens; asked by {request.requested_by or request.agent}", markup=False)
    console.print(f"  group {approval.group}, deadline {_when(approval.deadline_at)} UTC", markup=False)
    for event in approval.history:
        console.print(f"  {_line(event)}", soft_wrap=True, markup=False)


def _line(event: ApprovalRequested | ApprovalDecided | ApprovalReminder) -> str:
    when = f"{event.occurred_at:%Y-%m-%d %H:%M:%S}"
    if isinstance(event, ApprovalRequested):
        return (f"{when} requested {event.approval_id} (task {event.task_id}): {event.tool} {event.arguments} "
                f"[{event.rule}]")
    if isinstance(event, ApprovalReminder):
        return f"{when} reminded {event.approval_id}: group {event.group}, deadline {_when(event.deadline_at)}"
    by = f" by {event.reviewer}" if event.reviewer else ""
    return f"{when} {event.outcome} {event.approval_id}{by}" + (f": {event.reason}" if event.reason else "")


def _refused_exits(reply: ApprovalReply) -> None:
    if not reply.ok:
        console.print(f"[red]refused[/]: {escape(reply.message)}", soft_wrap=True)
        raise typer.Exit(1)


def _decide(nats: str | None, config: Path | None, command: DecideApproval) -> None:
    reply = _call(nats, config, lambda client, reviewer: client.decide_approval(command, reviewer=reviewer))
    _refused_exits(reply)
    approval = reply.approval
    console.print(f"{approval.request.approval_id}: {approval.status} by {approval.decided_by}"
                  + (" (already)" if "already" in reply.message else ""), soft_wrap=True, markup=False)


@app.command()
def approve(approval_id: IdArgument, reason: ReasonOption = "", tenant: TenantOption = "default",
            nats: NatsOption = None, config: ConfigOption = None) -> None:
    """Let the call run as asked."""
    _decide(nats, config, DecideApproval(tenant=tenant, approval_id=approval_id, decision="approve", reason=reason))


@app.command()
def deny(approval_id: IdArgument, reason: Annotated[str, typer.Option("--reason", help="why: the task fails with it")],
         tenant: TenantOption = "default", nats: NatsOption = None, config: ConfigOption = None) -> None:
    """Refuse the call: the task fails with the reason."""
    _decide(nats, config, DecideApproval(tenant=tenant, approval_id=approval_id, decision="deny", reason=reason))


@app.command()
def edit(approval_id: IdArgument,
         args: Annotated[str, typer.Option("--args", help="the tool's arguments to run instead, a JSON object")],
         reason: ReasonOption = "", tenant: TenantOption = "default", nats: NatsOption = None,
         config: ConfigOption = None) -> None:
    """Let the call run with other arguments (where the tenant's policy allows edits)."""
    _decide(nats, config, DecideApproval(tenant=tenant, approval_id=approval_id, decision="edit", reason=reason,
                                         arguments=args))


@app.command()
def history(
    tenant: Annotated[Optional[str], typer.Option("--tenant", help="one tenant's (default: every tenant's)")] = None,
    task: Annotated[Optional[str], typer.Option("--task", help="one task's")] = None,
    nats: NatsOption = None,
    config: ConfigOption = None,
) -> None:
    """Every request, decision, timeout and escalation, oldest first: who, when, what, why."""
    reply = _call(nats, config, lambda client, _: client.approval_history(ApprovalHistory(tenant=tenant, task_id=task)))
    for event in reply.events:
        console.print(_line(event), soft_wrap=True, markup=False)
