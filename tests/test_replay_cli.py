"""``creditflow replay``: recorded histories replay on this code; a history this code would not produce fails."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from creditflow.replay_cli import replay

HISTORY = Path(__file__).parent / "histories" / "account_workflow_v1_first_run.json"


def _run(*args: str) -> tuple[int, object]:
    import typer

    app = typer.Typer()
    app.command()(replay)
    result = CliRunner().invoke(app, [*args, "--json"])
    return result.exit_code, json.loads(result.stdout) if result.stdout.strip().startswith("[") else result.output


def test_recorded_history_replays(tmp_path: Path) -> None:
    code, out = _run(str(HISTORY))
    assert code == 0, out
    assert out == [{"workflow_id": "account_workflow_v1_first_run", "events": 27, "ok": True, "error": None}]


def test_a_history_the_code_would_not_produce_fails(tmp_path: Path) -> None:
    history = json.loads(HISTORY.read_text())
    scheduled = next(e for e in history["events"] if "activityTaskScheduledEventAttributes" in e)
    scheduled["activityTaskScheduledEventAttributes"]["activityType"]["name"] = "an_activity_this_code_never_calls"
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps(history))
    code, out = _run(str(changed))
    assert code == 1
    assert [(r["workflow_id"], r["ok"]) for r in out] == [("changed", False)]
    assert "nondetermin" in out[0]["error"].lower(), out
