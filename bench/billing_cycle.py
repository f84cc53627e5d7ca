"""Billing-cycle benchmark: what one renewal costs, for many accounts at once, on the time-skipping server.

N accounts (``--accounts``, default 1,000) subscribe to a plan; the clock skips one period; every account
workflow renews (closes the period, expires and grants plan credits, records the closed period) and starts its
InvoiceWorkflow (collects the period, drafts, renders HTML and a PDF, stores it). Invoices are issued but not
charged or emailed (the simulator's mode), so the figure is creditflow's own work. Prints the wall time of the
renewals + invoices, the rate, and the history events one account's cycle adds (account run + invoice workflow).

Run: ``make bench-cycle`` (``ARGS="--accounts 200"`` for a short run). Throwaway embedded PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path

from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from creditflow.config import Settings
from creditflow.embedded import start_postgres, stop_postgres
from creditflow.ledger.accounts import create_account
from creditflow.ledger.db import migrate, open_pool
from creditflow.ledger.plan_pricing import sync_plan_rates
from creditflow.ledger.ratecard import ensure_default_ratecard
from creditflow.simulate import _server_path
from workers.main import build_worker
from workflows.contract import (
    ACCOUNT_WORKFLOW,
    UPDATE_CHANGE_PLAN,
    AccountWorkflowInput,
    PlanChange,
    SubscriptionState,
    account_workflow_id,
    invoice_workflow_id,
)


async def main(accounts: int, plan: str, concurrency: int) -> None:
    pgdata = Path(tempfile.mkdtemp(prefix="creditflow-bench-cycle-"))
    url = start_postgres(pgdata)
    migrate(url)
    pool = open_pool(url, 2, 20)
    await pool.open()
    env = await WorkflowEnvironment.start_time_skipping(test_server_existing_path=_server_path(),
                                                        data_converter=pydantic_data_converter)
    try:
        await ensure_default_ratecard(pool)
        await sync_plan_rates(pool, Settings().plan_catalog())  # plan accounts are priced from these
        settings = Settings(database_url=url, welcome_bonus_credits=0)
        queue = f"bench-{uuid.uuid4().hex[:6]}"
        ids = [(await create_account(pool, name=f"bench {n}", billing_email="bench@localhost",
                                     welcome_bonus_credits=0)).id for n in range(accounts)]
        gate = asyncio.Semaphore(concurrency)
        async with build_worker(env.client, pool, settings, task_queue=queue):
            start = await env.get_current_time()

            runs: dict[str, str] = {}

            async def subscribe(account: str) -> SubscriptionState:
                async with gate:
                    handle = await env.client.start_workflow(
                        ACCOUNT_WORKFLOW, AccountWorkflowInput(account_id=account, publish_search_attributes=False,
                                                               simulation=True),
                        id=account_workflow_id(account), task_queue=queue)
                    runs[account] = handle.first_execution_run_id or ""
                    return await handle.execute_update(UPDATE_CHANGE_PLAN, PlanChange(plan_id=plan, anchor=start),
                                                       result_type=SubscriptionState)

            t0 = time.monotonic()
            states = await asyncio.gather(*(subscribe(a) for a in ids))
            subscribed = time.monotonic() - t0
            print(f"{accounts} subscriptions in {subscribed:.1f} s")
            period_key = states[0].period_start.date().isoformat()
            t1 = time.monotonic()
            await env.sleep(states[0].period_end - await env.get_current_time() + timedelta(seconds=1))
            while True:
                async with pool.connection() as conn:
                    row = await (await conn.execute(
                        "SELECT count(*) AS n FROM invoices WHERE period_key = %s AND status <> 'draft'",
                        (period_key,))).fetchone()
                done = int(row["n"]) if row else 0
                if done >= accounts:
                    break
                await asyncio.sleep(0.5)
            cycle = time.monotonic() - t1
            account_history = await env.client.get_workflow_handle(account_workflow_id(ids[0]),
                                                                   run_id=runs[ids[0]]).fetch_history()
            invoice_history = await env.client.get_workflow_handle(
                invoice_workflow_id(ids[0], period_key)).fetch_history()
        print(f"{accounts} renewals + invoices (HTML and PDF) in {cycle:.1f} s: {accounts / cycle:.1f} accounts/s, "
              f"{cycle / accounts * 1000:.0f} ms per account")
        print(f"history events per cycle: account workflow run {len(account_history.events)} (subscribe, renew, "
              "continue-as-new), "
              f"invoice workflow {len(invoice_history.events)}")
    finally:
        await env.shutdown()
        await pool.close()
        stop_postgres(pgdata)
        shutil.rmtree(pgdata, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--accounts", type=int, default=1000)
    parser.add_argument("--plan", default="growth")
    parser.add_argument("--concurrency", type=int, default=50)
    args = parser.parse_args()
    asyncio.run(main(args.accounts, args.plan, args.concurrency))
