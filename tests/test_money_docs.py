"""The operator docs of `creditflow verify` and `creditflow reconcile` match the code (pure: no services).

Why: issue 11 asks that both commands be documented; a doc that drifts from the CLI's options, the checks verify
runs or the differences reconcile reports sends an on-call operator looking for something that is not there."""

from __future__ import annotations

import re
from pathlib import Path

import typer.main

from creditflow.cli import app
from creditflow.ledger.verify import CHECKS

ROOT = Path(__file__).resolve().parent.parent
MONEY = (ROOT / "docs" / "money-invariants.md").read_text()
OPERATIONS = (ROOT / "docs" / "operations.md").read_text()


def _options(command: str) -> list[str]:
    params = typer.main.get_command(app).commands[command].params  # type: ignore[attr-defined]
    return [opt for p in params for opt in p.opts if opt.startswith("--")]


def test_every_option_of_verify_and_reconcile_is_documented() -> None:
    for command in ("verify", "reconcile"):
        [synopsis] = [line for line in OPERATIONS.splitlines() if line.startswith(f"creditflow {command} ")]
        usage = [line for line in MONEY.splitlines() if line.startswith(f"creditflow {command}")]
        for option in _options(command):
            assert option in synopsis, f"docs/operations.md: `{synopsis}` lacks {option}"
            assert any(option in line for line in usage), f"docs/money-invariants.md: {command} usage lacks {option}"


def test_the_checks_table_lists_exactly_what_verify_checks() -> None:
    table = MONEY.split("## The checks", 1)[1].split("\n#", 1)[0]
    documented = re.findall(r"^\| `(\w+)` \|", table, re.M)
    assert documented == [check.name for check in CHECKS]


def test_every_difference_reconcile_reports_is_documented() -> None:
    source = (ROOT / "creditflow" / "payments" / "reconcile.py").read_text()
    kinds = set(re.findall(r'_difference\(\s*"(\w+)"', source))
    kinds |= {k for pair in re.findall(r'\("(\w+)", "(\w+_not_applied)"\)', source) for k in pair}
    assert len(kinds) >= 15
    section = MONEY.split("# Reconciliation with Stripe", 1)[1].split("## Which check", 1)[0]
    missing = sorted(k for k in kinds if f"`{k}`" not in section
                     and not (k.endswith("_not_applied") and "`*_not_applied`" in section))
    assert missing == []
