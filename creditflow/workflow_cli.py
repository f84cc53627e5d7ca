"""What the CLI commands that ask a workflow (top-up, refund) share: connect to Temporal, send the
request with the answer timeout from settings, and turn a refusal into a message and exit code 1."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import TypeVar

import typer
from rich.console import Console

from creditflow.client import CreditflowClient
from creditflow.config import Settings
from creditflow.domain.refunds import RefundError
from creditflow.errors import CreditflowError

T = TypeVar("T")


def refuse(console: Console, exc: CreditflowError | RefundError) -> typer.Exit:
    """Print the stable code and message; the caller raises the returned exit (code 1)."""
    console.print(f"[red]{exc.code}[/red]: {exc.message}")
    return typer.Exit(1)


def ask_workflow(settings: Settings, console: Console,
                 ask: Callable[[CreditflowClient, timedelta], Awaitable[T]]) -> T:
    """Run ``ask(client, wait)`` against the configured Temporal; refusals exit with code 1."""

    async def run() -> T:
        try:
            client = await CreditflowClient.connect(settings)
        except RuntimeError as exc:
            raise CreditflowError("workflow_unavailable", f"Temporal at {settings.temporal_address}: {exc}") from exc
        return await ask(client, timedelta(seconds=settings.topup_answer_timeout_seconds))

    try:
        return asyncio.run(run())
    except CreditflowError as exc:
        raise refuse(console, exc) from exc
