"""``creditflow replay``: replay workflow histories against this code before deploying it.

A change that alters the commands a workflow issues for an existing history breaks every running workflow with
that history (a non-determinism error at its next task). Fetch the production histories that matter (running
account workflows, recent top-ups) and replay them here: nothing runs for real (no activity, no I/O), the SDK
only checks that this code makes the same decisions. Exit 1 when any history fails to replay.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from temporalio.client import WorkflowHistory

from creditflow.config import get_settings
from creditflow.ops_cli import JsonFlag, dumps

console = Console()


async def _replay(files: list[Path], workflow_ids: list[str], query: str | None, limit: int,
                  save_dir: Path | None) -> list[dict[str, object]]:
    from temporalio.contrib.pydantic import pydantic_data_converter
    from temporalio.worker import Replayer

    from creditflow.client import connect_temporal
    from workers.main import workflow_classes

    histories: list[WorkflowHistory] = []
    for path in files:
        text = path.read_text()
        histories.append(WorkflowHistory.from_json(json.loads(text).get("workflowId", path.stem)
                                                   if text.lstrip().startswith("{") else path.stem, text))
    if workflow_ids or query:
        client = await connect_temporal(get_settings())
        for wid in workflow_ids:
            histories.append(await client.get_workflow_handle(wid).fetch_history())
        if query:
            async for history in client.list_workflows(query, limit=limit).map_histories():
                histories.append(history)
    if save_dir:
        save_dir.mkdir(parents=True, exist_ok=True)
        for h in histories:
            (save_dir / f"{h.workflow_id.replace(':', '_')}.json").write_text(h.to_json())

    async def each() -> AsyncIterator[WorkflowHistory]:
        for h in histories:
            yield h

    replayer = Replayer(workflows=workflow_classes(), data_converter=pydantic_data_converter)
    results = await replayer.replay_workflows(each(), raise_on_replay_failure=False)
    return [{"workflow_id": h.workflow_id, "events": len(h.events),
             "ok": results.replay_failures.get(h.run_id) is None,
             "error": None if results.replay_failures.get(h.run_id) is None
             else f"{type(results.replay_failures[h.run_id]).__name__}: {results.replay_failures[h.run_id]}"}
            for h in histories]


def replay(
    files: Annotated[list[Path] | None, typer.Argument(exists=True, dir_okay=False,
                                                       help="History JSON files (temporal workflow show "
                                                            "--output json, or the UI's download).")] = None,
    workflow_id: Annotated[list[str] | None, typer.Option("--workflow-id", "-w",
                                                          help="Fetch this workflow's history (repeat).")] = None,
    query: Annotated[str | None, typer.Option(help="Fetch the histories of workflows matching this visibility "
                                                   "query, e.g. \"ExecutionStatus='Running'\".")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="At most this many from --query.")] = 100,
    save: Annotated[Path | None, typer.Option(help="Also write the fetched histories here (to keep them "
                                                   "as regression tests in tests/histories/).")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Replay workflow histories against this code (nothing is executed for real); exit 1 on any failure."""
    if not files and not workflow_id and not query:
        console.print("give history files, --workflow-id or --query")
        raise typer.Exit(2)
    results = asyncio.run(_replay(list(files or []), list(workflow_id or []), query, limit, save))
    if as_json:
        print(dumps(results))
    else:
        for r in results:
            mark = "[green]ok[/]" if r["ok"] else f"[red]FAILED[/] {r['error']}"
            console.print(f"{r['workflow_id']} ({r['events']} events): {mark}", soft_wrap=True, highlight=False)
        console.print(f"{sum(1 for r in results if r['ok'])} of {len(results)} replayed")
    raise typer.Exit(0 if all(r["ok"] for r in results) else 1)
