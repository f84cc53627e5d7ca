"""``creditflow agents``: list an account's agents, and pause or resume one.

Pause and resume go through the account workflow (update ``pause_agent`` / ``resume_agent`` on
``account:{account_id}``), exactly as the API and other services do: it records the change with its audit
trail and tells the customer's service. Operators can also send the signal from the Temporal UI or with
``temporal workflow signal --workflow-id account:<id> --name pause_agent --input '{"agent_id": "..."}'``.
"""

from __future__ import annotations

import getpass
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from creditflow.config import get_settings
from creditflow.errors import CreditflowError
from creditflow.ids import check_id, check_token
from creditflow.ledger import agents
from creditflow.ops_cli import run
from creditflow.workflow_cli import ask_workflow, refuse
from workflows.contract import AgentCommand

console = Console()
agents_app = typer.Typer(help="List agents; pause or resume one (through the account workflow).",
                         no_args_is_help=True)


@agents_app.command("list")
def agents_list(account_id: Annotated[str, typer.Argument(help="The account (acc_...).")]) -> None:
    """The account's agents with their status and spend this month."""
    rows = run(lambda pool: agents.list_agents(pool, account_id))
    table = Table("agent", "name", "status", "paused by", "reason", "spent this month (µcr)", "monthly limit (µcr)")
    for a in rows:
        table.add_row(a.id, a.name, a.status, a.paused_by or "", a.pause_reason or "", f"{a.month_spent_micros:,}",
                      "" if a.monthly_limit_micros is None else f"{a.monthly_limit_micros:,}")
    console.print(table)


def _change(account_id: str, agent_id: str, reason: str | None, actor: str | None, *, paused: bool) -> None:
    settings = get_settings()
    try:
        check_id(account_id, "acc", "account_id")
        check_token(agent_id, "agent id")
        command = AgentCommand(agent_id=agent_id, actor=actor or f"operator {getpass.getuser()} (CLI)", reason=reason)
    except CreditflowError as exc:
        raise refuse(console, exc) from exc
    status = ask_workflow(settings, console,
                          lambda client, wait: client.set_agent_status(account_id, command, paused=paused, wait=wait))
    console.print(f"agent {status.agent_id}: {status.status}" + (f" ({status.reason})" if status.reason else ""))


@agents_app.command("pause")
def agents_pause(
    account_id: Annotated[str, typer.Argument(help="The account (acc_...).")],
    agent_id: Annotated[str, typer.Argument(help="The agent id.")],
    reason: Annotated[str | None, typer.Option(help="Kept in the audit trail and sent to the customer.")] = None,
    actor: Annotated[str | None, typer.Option(help="Who asks (default: operator <user> (CLI)).")] = None,
) -> None:
    """Pause an agent: its usage is refused (agent_paused) until it is resumed; never resumed by the system."""
    _change(account_id, agent_id, reason, actor, paused=True)


@agents_app.command("resume")
def agents_resume(
    account_id: Annotated[str, typer.Argument(help="The account (acc_...).")],
    agent_id: Annotated[str, typer.Argument(help="The agent id.")],
    reason: Annotated[str | None, typer.Option(help="Kept in the audit trail.")] = None,
    actor: Annotated[str | None, typer.Option(help="Who asks (default: operator <user> (CLI)).")] = None,
) -> None:
    """Resume a paused agent."""
    _change(account_id, agent_id, reason, actor, paused=False)
