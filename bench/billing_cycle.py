"""Billing-cycle benchmark: what one renewal costs, at several sizes, on the time-skipping server.

For each size (``--accounts 250,500,1000``) a fresh embedded PostgreSQL and a fresh time-skipping Temporal server:
N accounts subscribe to a plan; the clock skips one period; every account workflow renews (closes the period,
expires and grants plan credits, records the closed period) and starts its InvoiceWorkflow (collects the period,
drafts, renders HTML and a PDF, stores it, issues it). Invoices are issued but not charged or emailed (the
simulator's mode), so the figure is creditflow's own work. The timed window runs from the clock skip until the
last invoice is issued.

Per size: wall seconds, renewals/s, ms per account, the worker process's CPU seconds, the 1-minute load average
before and after, and where the time went (activity count and mean duration per activity type). Then the
linearity check (ms per account at the largest size / at the smallest; 1.0 is linear) and issue 16's goal
(1,000 accounts in under 60 s). ``--rounds N`` runs the sizes N times (in reverse order every other round) and
prints each size's median (min-max) and the linearity per round. ``--json PATH`` (``-`` for stdout) writes the
same figures.

The workflow sandbox imports the workflow modules again for every workflow run: without their .pyc files (a
machine with PYTHONDONTWRITEBYTECODE=1, as this one and the Dockerfile's build stage; pip's install compiles them
for the image) each run compiles them from source, about 4 % of the worker's CPU here. The bench compiles them
first, as an installed package has them.

Run: ``make bench-cycle`` (``ARGS="--accounts 100"`` for a short run). Throwaway embedded PostgreSQL.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script: the repository on sys.path (``bench.*`` imports) instead of bench/ itself, so that no bench file
# can shadow a standard module (bench/http.py once shadowed ``http``).
_BENCH_DIR = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH_DIR]
sys.path.insert(0, str(_BENCH_DIR.parent))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections import defaultdict  # noqa: E402
from datetime import timedelta  # noqa: E402
from typing import Any  # noqa: E402

import psutil  # noqa: E402
from temporalio.contrib.pydantic import pydantic_data_converter  # noqa: E402
from temporalio.testing import WorkflowEnvironment  # noqa: E402
from temporalio.worker import ActivityInboundInterceptor, ExecuteActivityInput, Interceptor  # noqa: E402

from creditflow.config import Settings  # noqa: E402
from creditflow.embedded import postgres_pid, start_postgres, stop_postgres  # noqa: E402
from creditflow.ledger.accounts import create_account  # noqa: E402
from creditflow.ledger.db import migrate, open_pool  # noqa: E402
from creditflow.ledger.plan_pricing import sync_plan_rates  # noqa: E402
from creditflow.ledger.ratecard import ensure_default_ratecard  # noqa: E402
from creditflow.simulate import _server_path  # noqa: E402
from workers.main import build_worker, worker_options  # noqa: E402
from workflows.contract import (  # noqa: E402
    ACCOUNT_WORKFLOW,
    UPDATE_CHANGE_PLAN,
    AccountWorkflowInput,
    PlanChange,
    SubscriptionState,
    account_workflow_id,
    invoice_workflow_id,
)

GOAL_ACCOUNTS = 1000
GOAL_SECONDS = 60.0


class ActivityTimes(Interceptor):
    """Count and total duration (as the worker saw it: start to finish of the attempt) per activity type."""

    def __init__(self) -> None:
        self.count: dict[str, int] = defaultdict(int)
        self.seconds: dict[str, float] = defaultdict(float)

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _Timed(next, self)

    def reset(self) -> None:
        self.count.clear()
        self.seconds.clear()

    def report(self) -> dict[str, dict[str, float]]:
        return {name: {"count": n, "total_s": round(self.seconds[name], 2),
                       "mean_ms": round(self.seconds[name] / n * 1000, 1)}
                for name, n in sorted(self.count.items(), key=lambda kv: -self.seconds[kv[0]])}


class _Timed(ActivityInboundInterceptor):
    def __init__(self, next: ActivityInboundInterceptor, times: ActivityTimes) -> None:
        super().__init__(next)
        self._times = times

    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        t0 = time.monotonic()
        try:
            return await super().execute_activity(input)
        finally:
            name = getattr(input.fn, "__temporal_activity_definition").name
            self._times.count[name] += 1
            self._times.seconds[name] += time.monotonic() - t0


def load() -> float:
    return round(os.getloadavg()[0], 2)


def cpu_seconds(pgdata: Path) -> dict[str, float]:
    """CPU seconds so far of the worker (this process, all threads, and its render processes), of the Temporal
    test server and of the PostgreSQL server on ``pgdata``."""
    me = psutil.Process()
    out = {"worker": 0.0, "temporal": 0.0, "postgres": 0.0}
    postmaster = postgres_pid(pgdata)
    for proc in psutil.process_iter():
        try:
            name = proc.name()
            kind = ("worker" if proc.pid == me.pid or (proc.ppid() == me.pid and name.startswith("python"))
                    else "temporal" if name.startswith("temporal") and proc.ppid() == me.pid
                    else "postgres" if postmaster and postmaster in (proc.pid, proc.ppid())
                    else None)
            if kind is not None:
                t = proc.cpu_times()
                out[kind] += t.user + t.system
        except psutil.Error:
            continue
    return out


async def run_size(accounts: int, plan: str, concurrency: int, settings_overrides: dict[str, Any]) -> dict[str, Any]:
    """One size on fresh servers: subscribe ``accounts`` accounts, skip a period, time the renewals + invoices."""
    pgdata = Path(tempfile.mkdtemp(prefix="creditflow-bench-cycle-"))
    url = start_postgres(pgdata)
    migrate(url)
    settings = Settings(database_url=url, welcome_bonus_credits=0, **settings_overrides)
    pool = open_pool(url, settings.db_pool_min_size, settings.db_pool_max_size)
    await pool.open()
    env = await WorkflowEnvironment.start_time_skipping(test_server_existing_path=_server_path(),
                                                        data_converter=pydantic_data_converter)
    times = ActivityTimes()
    try:
        await ensure_default_ratecard(pool)
        await sync_plan_rates(pool, settings.plan_catalog())  # plan accounts are priced from these
        queue = f"bench-{uuid.uuid4().hex[:6]}"
        ids = [(await create_account(pool, name=f"bench {n}", billing_email="bench@localhost",
                                     welcome_bonus_credits=0)).id for n in range(accounts)]
        gate = asyncio.Semaphore(concurrency)
        async with build_worker(env.client, pool, settings, task_queue=queue, interceptors=[times]):
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
            print(f"  {accounts} subscriptions in {subscribed:.1f} s", file=sys.stderr)
            period_key = states[0].period_start.date().isoformat()
            times.reset()
            load_before, cpu0 = load(), cpu_seconds(pgdata)
            t1 = time.monotonic()
            await env.sleep(states[0].period_end - await env.get_current_time() + timedelta(seconds=1))
            while True:
                async with pool.connection() as conn:
                    row = await (await conn.execute(
                        "SELECT count(*) AS n FROM invoices WHERE period_key = %s AND status <> 'draft'",
                        (period_key,))).fetchone()
                if row is not None and int(row["n"]) >= accounts:
                    break
                await asyncio.sleep(0.2)
            cycle = time.monotonic() - t1
            cpu1 = cpu_seconds(pgdata)
            cpu = {k: round(cpu1[k] - cpu0[k], 2) for k in cpu1}
            load_after = load()
            account_history = await env.client.get_workflow_handle(account_workflow_id(ids[0]),
                                                                   run_id=runs[ids[0]]).fetch_history()
            invoice_history = await env.client.get_workflow_handle(
                invoice_workflow_id(ids[0], period_key)).fetch_history()
        return {"accounts": accounts, "subscribe_s": round(subscribed, 2), "cycle_s": round(cycle, 2),
                "renewals_per_s": round(accounts / cycle, 2), "ms_per_account": round(cycle / accounts * 1000, 1),
                "cpu_s": cpu, "worker_cpu_ms_per_account": round(cpu["worker"] / accounts * 1000, 1),
                "load_before": load_before, "load_after": load_after, "activities": times.report(),
                "history_events": {"account_run": len(account_history.events),
                                   "invoice": len(invoice_history.events)}}
    finally:
        await env.shutdown()
        await pool.close()
        stop_postgres(pgdata)
        shutil.rmtree(pgdata, ignore_errors=True)


def print_report(result: dict[str, Any]) -> None:
    w = result["worker"]
    print(f"worker: {', '.join(f'{k}={v}' for k, v in w.items())}; {result['cpus']} CPUs")
    print(f"{'round':>5} {'accounts':>8} {'wall s':>8} {'renewals/s':>10} {'ms/account':>10} {'worker CPU ms/acc':>17} "
          f"{'CPU s worker/temporal/pg':>24} {'load before':>11} {'load after':>10}")
    for r in result["sizes"]:
        c = r["cpu_s"]
        cpu = f"{c['worker']:.1f}/{c['temporal']:.1f}/{c['postgres']:.1f}"
        print(f"{r['round'] + 1:>5} {r['accounts']:>8} {r['cycle_s']:>8.1f} {r['renewals_per_s']:>10.1f} "
              f"{r['ms_per_account']:>10.1f} "
              f"{r['worker_cpu_ms_per_account']:>17.1f} {cpu:>24} {r['load_before']:>11} {r['load_after']:>10}")
    for r in result["sizes"]:
        acts = ", ".join(f"{name} {a['count']}x {a['mean_ms']:.0f} ms" for name, a in r["activities"].items())
        print(f"  round {r['round'] + 1}, {r['accounts']}: subscriptions {r['subscribe_s']:.1f} s (untimed); "
              f"activities: {acts}")
    h = result["sizes"][-1]["history_events"]
    print(f"history events per cycle: account workflow run {h['account_run']} (subscribe, renew, continue-as-new), "
          f"invoice workflow {h['invoice']}")
    for n, v in result["summary"].items():
        wall, per = v["cycle_s"], v["ms_per_account"]
        print(f"{n} accounts over {result['rounds']} round(s): wall median {wall['median']:.1f} s "
              f"({wall['min']:.1f}-{wall['max']:.1f}), ms/account {per['median']:.1f} "
              f"({per['min']:.1f}-{per['max']:.1f})")
    lin = result["linearity"]
    if lin:
        print(f"linearity: ms per account at {lin['large']} / at {lin['small']}, per round: median {lin['ratio']:.2f} "
              f"({lin['min']:.2f}-{lin['max']:.2f}) (1.00 = linear)")
    goal = result["goal"]
    if goal:
        print(f"goal: {GOAL_ACCOUNTS} accounts in < {GOAL_SECONDS:.0f} s: median {goal['seconds']:.1f} s "
              f"({goal['min']:.1f}-{goal['max']:.1f}), {'met' if goal['met'] else 'NOT met'}")


async def main(args: argparse.Namespace) -> dict[str, Any]:
    import compileall

    for package in ("workflows", "creditflow", "activities", "workers"):
        compileall.compile_dir(_BENCH_DIR.parent / package, quiet=1)
    overrides: dict[str, Any] = {}
    for name in ("worker_max_concurrent_activities", "worker_max_concurrent_workflow_tasks",
                 "worker_max_cached_workflows", "invoice_render_processes"):
        value = getattr(args, name.removeprefix("worker_"))
        if value is not None:
            overrides[name] = value
    sizes = []
    for r in range(args.rounds):  # sizes in order, reversed every other round: drift falls on every size
        for n in (args.accounts if r % 2 == 0 else list(reversed(args.accounts))):
            print(f"round {r + 1}/{args.rounds}: {n} accounts (load {load()})...", file=sys.stderr)
            sizes.append({"round": r, **await run_size(n, args.plan, args.concurrency, overrides)})
            print(f"  {n} renewals + invoices in {sizes[-1]['cycle_s']:.1f} s", file=sys.stderr)
    settings = Settings(**overrides)
    worker = {**worker_options(settings), "db_pool_max_size": settings.db_pool_max_size,
              "invoice_render_processes": settings.invoice_render_processes}
    from bench.metering import spread

    small, large = min(args.accounts), max(args.accounts)
    by_round = {(x["round"], x["accounts"]): x for x in sizes}
    linearity = None
    if small != large:  # ms per account at the largest size / at the smallest, within each round
        ratios = [by_round[r, large]["ms_per_account"] / by_round[r, small]["ms_per_account"]
                  for r in range(args.rounds)]
        linearity = {"small": small, "large": large, "ratio": spread(ratios)["median"], **spread(ratios)}
    summary = {n: {"cycle_s": spread([x["cycle_s"] for x in sizes if x["accounts"] == n]),
                   "ms_per_account": spread([x["ms_per_account"] for x in sizes if x["accounts"] == n]),
                   "worker_cpu_ms_per_account": spread([x["worker_cpu_ms_per_account"] for x in sizes
                                                        if x["accounts"] == n])}
               for n in args.accounts}
    goal = None
    if GOAL_ACCOUNTS in summary:
        at_goal = summary[GOAL_ACCOUNTS]["cycle_s"]
        goal = {"seconds": at_goal["median"], "min": at_goal["min"], "max": at_goal["max"],
                "met": at_goal["median"] < GOAL_SECONDS}
    return {"bench": "billing_cycle", "plan": args.plan, "cpus": os.cpu_count(), "worker": worker,
            "rounds": args.rounds, "sizes": sizes, "summary": summary, "linearity": linearity, "goal": goal}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--accounts", type=lambda s: [int(n) for n in s.split(",")], default=[250, 500, 1000],
                        help="comma-separated sizes, each on fresh servers (default 250,500,1000)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="rounds over the sizes (order reversed every other round); figures: median (min-max)")
    parser.add_argument("--plan", default="growth")
    parser.add_argument("--concurrency", type=int, default=50, help="concurrent subscriptions (untimed setup)")
    parser.add_argument("--max-concurrent-activities", type=int,
                        help="override CREDITFLOW_WORKER_MAX_CONCURRENT_ACTIVITIES")
    parser.add_argument("--max-concurrent-workflow-tasks", type=int,
                        help="override CREDITFLOW_WORKER_MAX_CONCURRENT_WORKFLOW_TASKS")
    parser.add_argument("--max-cached-workflows", type=int, help="override CREDITFLOW_WORKER_MAX_CACHED_WORKFLOWS")
    parser.add_argument("--invoice-render-processes", type=int,
                        help="override CREDITFLOW_INVOICE_RENDER_PROCESSES")
    parser.add_argument("--json", metavar="PATH", help="write the figures as JSON (- for stdout)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    report = asyncio.run(main(arguments))
    print_report(report)
    if arguments.json:
        from bench.metering import write_json

        write_json(report, arguments.json)
