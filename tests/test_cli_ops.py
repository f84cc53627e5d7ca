"""Operator CLI commands against a real database."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from typer.testing import CliRunner

from creditflow.ops_cli import accounts_app, keys_app, wallet_app
from tests.support.cli import cli_environment


@pytest.fixture
def cli_env(database_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    with cli_environment(monkeypatch, database_url, {"CREDITFLOW_WELCOME_BONUS_CREDITS": "100"}):
        yield


def test_operator_flow(cli_env: None) -> None:
    runner = CliRunner()
    created = runner.invoke(accounts_app, ["create", "--name", "Acme", "--email", "ops@acme.test"])
    assert created.exit_code == 0, created.output
    account_id = re.search(r"acc_[0-9a-f]{32}", created.output)[0]  # type: ignore[index]
    assert "balance 100" in created.output

    args = ["credit", account_id, "--amount", "250", "--reason", "SLA credit", "--idempotency-key", "k"]
    credit = runner.invoke(wallet_app, args)
    assert credit.exit_code == 0 and "balance 350" in credit.output
    replay = runner.invoke(wallet_app, args)
    assert "replayed" in replay.output and "balance 350" in replay.output
    too_much = runner.invoke(wallet_app, ["credit", account_id, "--amount", "-1000", "--reason", "oops"])
    assert too_much.exit_code == 1 and "insufficient_credits" in too_much.output

    history = runner.invoke(wallet_app, ["history", account_id])
    assert "adjustment" in history.output and "welcome_bonus" in history.output and "2 of 2" in history.output

    key = runner.invoke(keys_app, ["create", account_id, "--scope", "billing:read"])
    assert key.exit_code == 0 and "cf_sk_" in key.output
    listed = runner.invoke(keys_app, ["list", account_id])
    assert "billing:read" in listed.output

    unknown = runner.invoke(accounts_app, ["show", "acc_" + "0" * 32])
    assert unknown.exit_code == 1 and "unknown_account" in unknown.output


def test_help_lists_the_stack_and_operator_commands() -> None:
    from creditflow.cli import app

    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for command in ("dev", "api", "worker", "migrate", "ratecard", "accounts", "keys", "wallet"):
        assert f" {command} " in result.output


def test_migrate_and_ratecard_load_print_json(cli_env: None) -> None:
    """`--json` on every operator command, the two that change the schema and the rates included."""
    import json
    from pathlib import Path

    import creditflow
    from creditflow.cli import app

    runner = CliRunner()
    migrated = runner.invoke(app, ["migrate", "--json"])
    assert migrated.exit_code == 0, migrated.output
    assert json.loads(migrated.stdout) == {"applied": [], "ratecard_seeded": False}  # the test database is current

    card = Path(creditflow.__file__).parent / "ratecard.default.yaml"
    loaded = runner.invoke(app, ["ratecard", "load", str(card), "--json"])
    assert loaded.exit_code == 0, loaded.output
    body = json.loads(loaded.stdout)
    shown = json.loads(runner.invoke(app, ["ratecard", "show", "--json"]).stdout)
    assert body == {"path": str(card), "features": shown}
    assert {"id": "llm_tokens", "credits_per_unit": 0.1}.items() <= next(
        f for f in shown if f["id"] == "llm_tokens").items()
