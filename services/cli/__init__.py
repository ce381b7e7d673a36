"""`corral`: the command line of Corral, one module per command group.

    common.py     what every group shares: --nats and --config, settings, console, errors as exit codes
    stack.py      service, up, demo: run one service, the whole stack, the demo
    tasks.py      submit, status
    contracts.py  contracts: write the JSON Schemas
    budget.py     cost, and the `budget` group: show
    policy.py     the `policy` group: apply, show, history, rollback
    breakers.py   the `breakers` group: list, force-open, force-closed, release
    sim.py        the `sim` group: fail, slow, recover a simulated dependency
    auth.py       the `auth` group: init, show, revoke identities
    alerts.py     the `alerts` group: firing, history, silence
    top.py        top: the terminal dashboard
    dashboard.py  dashboard: the web dashboard
    approvals.py  the `approvals` group: list, show, approve, deny, edit, history

To add a command group, write one module with `app = typer.Typer(help=...)` and its
commands, importing nothing of this package but `common`, and register it below with one
line: `app.add_typer(module.app, name="NAME")` for `corral NAME ...`, or without a name to
put its commands at the top level. Groups never import each other; a test checks it.
"""

from __future__ import annotations

import typer

from services.cli import (
    alerts,
    approvals,
    auth,
    breakers,
    budget,
    contracts,
    dashboard,
    policy,
    sim,
    stack,
    tasks,
    top,
)

app = typer.Typer(help="Corral: a control plane for AI agents over NATS JetStream.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
app.add_typer(stack.app)  # corral service, up, demo
app.add_typer(tasks.app)  # corral submit, status
app.add_typer(contracts.app)  # corral contracts
app.add_typer(budget.cost_app)  # corral cost TASK_ID
app.add_typer(policy.app, name="policy")
app.add_typer(budget.app, name="budget")
app.add_typer(breakers.app, name="breakers")
app.add_typer(sim.app, name="sim")
app.add_typer(auth.app, name="auth")
app.add_typer(alerts.app, name="alerts")
app.add_typer(top.app)  # corral top
app.add_typer(dashboard.app)  # corral dashboard
app.add_typer(approvals.app, name="approvals")
