"""Opt-in pytest plugin for proving what ``creditflow verify`` / ``creditflow reconcile`` see (docs/verify-proofs.md):
``pytest -s -p tests.verify_probe tests/test_x.py -k ...`` runs, after each test, ``creditflow verify`` (the real
CLI, through typer's runner) on the database the test left, before it is dropped; with ``PROBE_RECONCILE=1`` also one
reconciliation run (the engine ``ReconciliationWorkflow``'s activity runs, against the test's Stripe emulator) and
``creditflow reconcile --show RUN`` on its stored report, then verify again; ``PROBE_WAIT_SECONDS=N`` first waits N
seconds of wall-clock time (checks that give a renewal minutes to finish). Why: a defect's regression test, run with
its fix reverted on a scratch branch, leaves exactly the state the defect makes; this shows what the product's own
checks say about it. Not loaded unless asked for (``-p``); never part of the suite."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from typer.testing import CliRunner


def _cli(url: str, *args: str) -> str:
    from creditflow import ops_cli
    from creditflow.cli import app
    from creditflow.config import get_settings

    os.environ["CREDITFLOW_DATABASE_URL"] = url
    get_settings.cache_clear()
    ops_cli.console.width = 700
    out = CliRunner().invoke(app, list(args))
    get_settings.cache_clear()
    return f"$ creditflow {' '.join(args)}   (exit {out.exit_code})\n{out.output}"


@pytest.fixture(autouse=True)
async def verify_probe(request: pytest.FixtureRequest, database_url: str) -> AsyncIterator[None]:
    stripe_base = request.getfixturevalue("stripe_base") if os.environ.get("PROBE_RECONCILE") else None
    yield
    wait = float(os.environ.get("PROBE_WAIT_SECONDS", "0"))
    if wait:  # checks that give a renewal time to finish (closed_at < now() - 5 minutes) need real time to pass
        print(f"\n===== PROBE: waiting {wait:.0f} s of wall-clock time =====")
        await asyncio.sleep(wait)
    print("\n===== PROBE: verify on the database the test left =====")
    print(await asyncio.to_thread(_cli, database_url, "verify"))
    if stripe_base is None:
        return
    from creditflow.config import Settings
    from creditflow.ledger.db import open_pool
    from creditflow.ledger.verify import verify
    from creditflow.payments.gateway import StripeGateway
    from creditflow.payments.reconcile import Reconciler, complete_run, open_run, record_result
    from tests.conftest import ADMIN_KEY, STRIPE_KEY

    settings = Settings(database_url=database_url, admin_api_key=ADMIN_KEY,  # type: ignore[arg-type]
                        stripe_api_key=STRIPE_KEY, stripe_api_base=stripe_base)  # type: ignore[arg-type]
    pool = open_pool(database_url, 1, 4)
    await pool.open()
    try:
        now = datetime.now(UTC) + timedelta(seconds=2)
        window = await open_run(pool, f"probe:{uuid.uuid4().hex[:8]}", trigger="manual",
                                since=now - timedelta(hours=2), now=now)
        result = await Reconciler(pool, StripeGateway.from_settings(settings), window, now=now,
                                  server_filter=False, grace=timedelta(0)).run()
        await record_result(pool, result)
        await complete_run(pool, window.run_id, violations=len((await verify(pool)).violations))
    finally:
        await pool.close()
    print("===== PROBE: one reconciliation run (the workflow's engine), then its stored report =====")
    print(await asyncio.to_thread(_cli, database_url, "reconcile", "--show", window.run_id))
    print("===== PROBE: verify after the reconciliation run =====")
    print(await asyncio.to_thread(_cli, database_url, "verify"))
