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
from creditflow.ledger import lookup
from creditflow.ops_cli import JsonFlag, answer, emit
from creditflow.workflow_cli import ask_workflow, refuse
from workflows.contract import AgentCommand

console = Console()
agents_app = typer.Typer(help="List agents; pause or resume one (through the account workflow).",
                         no_args_is_help=True)


def _when(moment: object) -> str:
    return "" if moment is None else str(moment)


@agents_app.command("list")
def agents_list(account_id: Annotated[str, typer.Argument(help="The account (acc_...).")],
                as_json: JsonFlag = False) -> None:
    """The account's agents with their status, when they were paused and when they resume (a system pause
    ends by itself at the next UTC day or month; an operator's or customer's pause only when resumed), and
    spend this month in credits."""
    rows = answer(lambda pool: lookup.agents_of(pool, account_id), f"/api/v1/operator/accounts/{account_id}/agents",
                  None, as_json)

    def render() -> None:
        table = Table("agent", "name", "status", "paused by", "reason", "paused at", "resumes at",
                      "spent this month (credits)", "monthly limit (credits)")
        for a in rows:
            resumes = _when(a["resume_at"]) if a["resume_at"] else ("when resumed" if a["status"] == "paused" else "")
            table.add_row(a["id"], a["name"], a["status"], a["paused_by"] or "", a["pause_reason"] or "",
                          _when(a["paused_at"]), resumes, str(a["month_spent"]), _when(a["monthly_limit"]))
        console.print(table)

    emit(rows, as_json, render)


@agents_app.command("events")
def agents_events(
    account_id: Annotated[str, typer.Argument(help="The account (acc_...).")],
    agent_id: Annotated[str, typer.Argument(help="The agent id.")],
    limit: Annotated[int, typer.Option(min=1, max=1000, help="At most this many, oldest first.")] = 100,
    as_json: JsonFlag = False,
) -> None:
    """The agent's audit trail: every pause and resume with its time, who asked and why."""
    trail = answer(lambda pool: lookup.agent_trail(pool, account_id, agent_id, limit),
                   f"/api/v1/operator/accounts/{account_id}/agents/{agent_id}/events", {"limit": limit}, as_json)
    agent, events = trail["agent"], trail["events"]

    def render() -> None:
        table = Table("time", "action", "actor", "reason")
        for e in events:
            table.add_row(str(e["created_at"]), e["action"], e["actor"], e["reason"] or "")
        console.print(table)
        now = f"now {agent['status']}"
        if agent["paused_at"]:
            now += f" since {agent['paused_at']} by {agent['paused_by']}"
        if agent["status"] == "paused":
            now += f", resumes {agent['resume_at']}" if agent["resume_at"] else ", until resumed"
        console.print(f"{len(events)} events; {now}")

    emit(trail, as_json, render)


def _change(account_id: str, agent_id: str, reason: str | None, actor: str | None, *, paused: bool,
            as_json: bool = False) -> None:
    settings = get_settings()
    try:
        check_id(account_id, "acc", "account_id")
        check_token(agent_id, "agent id")
        command = AgentCommand(agent_id=agent_id, actor=actor or f"operator {getpass.getuser()} (CLI)", reason=reason)
    except CreditflowError as exc:
        raise refuse(console, exc) from exc
    status = ask_workflow(settings, console,
                          lambda client, wait: client.set_agent_status(account_id, command, paused=paused, wait=wait))
    emit(status, as_json, lambda: console.print(
        f"agent {status.agent_id}: {status.status}" + (f" ({status.reason})" if status.reason else "")))


@agents_app.command("pause")
def agents_pause(
    account_id: Annotated[str, typer.Argument(help="The account (acc_...).")],
    agent_id: Annotated[str, typer.Argument(help="The agent id.")],
    reason: Annotated[str | None, typer.Option(help="Kept in the audit trail and sent to the customer.")] = None,
    actor: Annotated[str | None, typer.Option(help="Who asks (default: operator <user> (CLI)).")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Pause an agent: its usage is refused (agent_paused) until it is resumed; never resumed by the system."""
    _change(account_id, agent_id, reason, actor, paused=True, as_json=as_json)


@agents_app.command("resume")
def agents_resume(
    account_id: Annotated[str, typer.Argument(help="The account (acc_...).")],
    agent_id: Annotated[str, typer.Argument(help="The agent id.")],
    reason: Annotated[str | None, typer.Option(help="Kept in the audit trail.")] = None,
    actor: Annotated[str | None, typer.Option(help="Who asks (default: operator <user> (CLI)).")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Resume a paused agent."""
    _change(account_id, agent_id, reason, actor, paused=False, as_json=as_json)
