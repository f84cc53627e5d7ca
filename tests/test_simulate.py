"""``creditflow simulate``: a usage trace replayed through the real workflows on the time-skipping server."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest
from typer.testing import CliRunner

from creditflow.simulate import read_usage, run_simulation

pytestmark = pytest.mark.temporal

TRACE = """day,feature_id,value,agent_id
0.5,chat_message,1200,support
3,llm_tokens,24500,
20,chat_message,800,support
35,chat_message,3000,
40,chat_message,2500,sales
70.25,llm_tokens,10000,
"""


async def test_three_months_of_growth(tmp_path: Path, database_url: str) -> None:
    trace = tmp_path / "usage.csv"
    trace.write_text(TRACE)
    report = await run_simulation("growth", read_usage(trace), 3, database_url=database_url,
                                  welcome_bonus_credits=1000)
    assert [(p.usage_events, p.denied_events, p.usage_credits) for p in report.periods] == [
        (3, 0, Decimal(4050)), (2, 0, Decimal(4400)), (1, 0, Decimal(1000))]  # Growth prices chat at 0.8
    assert [p.invoice_total_usd for p in report.periods] == [Decimal(199)] * 3
    # Plan credits are spent first and expire at each renewal; the wallet's 1,000 are untouched.
    assert [p.balance_after for p in report.periods] == [Decimal(23_000)] * 3
    assert (report.final_balance, report.plan_credits_remaining) == (Decimal(23_000), Decimal(22_000))
    assert report.periods[0].start < report.periods[1].start < report.periods[2].start


def test_cli_reports_json_and_refuses_bad_traces(tmp_path: Path, database_url: str) -> None:
    from creditflow.cli import app

    trace = tmp_path / "usage.csv"
    trace.write_text(TRACE)
    result = CliRunner().invoke(app, ["simulate", "--plan", "starter", "--usage", str(trace), "--months", "1",
                                      "--database-url", database_url, "--json"])
    assert result.exit_code == 0, result.output
    body = json.loads(result.output)
    [period] = body["periods"]
    assert (period["usage_events"], period["usage_credits"], period["invoice_total_usd"]) == (3, "4450", "49")
    bad = tmp_path / "bad.csv"
    bad.write_text("day,feature_id,value\n1,chat_message,-5\n")
    refused = CliRunner().invoke(app, ["simulate", "--plan", "starter", "--usage", str(bad)])
    assert refused.exit_code == 1 and "validation_error" in refused.output and "bad.csv:2" in refused.output
    unknown = CliRunner().invoke(app, ["simulate", "--plan", "platinum", "--usage", str(trace),
                                       "--database-url", database_url])
    assert unknown.exit_code == 1 and "unknown_plan" in unknown.output
