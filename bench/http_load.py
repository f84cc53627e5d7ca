"""HTTP benchmark: ``/billing/track``, ``/check`` and ``/track/batch`` through a real ``creditflow api``.

It starts the embedded PostgreSQL (or uses ``CREDITFLOW_DATABASE_URL``), a fresh migrated database with funded
accounts (bench/metering.py's setup) and one ``usage:write`` key per account, then ``creditflow api`` as a
subprocess (``--api-workers`` processes on one port). The load comes from several client processes (aiohttp,
keep-alive connections, each request with the key of the account it meters), at 1, 8 and 32 connections, for a
fixed time per phase, in ``--rounds`` rounds (default 3; each round runs the library phase and the HTTP phases
at every connection count, the library phase after the HTTP ones in odd rounds, so drift falls on both sides):
ratios and the goals are the medians of the rounds, with their ranges. Each phase reports events/s, p50/p99
latency and the CPU per request of the load generator
(psutil, its own processes), of the API processes and of PostgreSQL, and says whether a client process was
saturated (then the figure is the client's, not the server's). In the same run, at each connection count, the
library-level ``metering.track`` phase of bench/metering.py runs in this process, so HTTP/library is printed.
The ledger invariants are verified at the end. Run ``make bench-http`` (``ARGS="--quick"``); bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `bench.metering` when run as a script

ENDPOINTS = ("track", "check", "batch")
PATHS = {"track": "/api/v1/billing/track", "check": "/api/v1/billing/check", "batch": "/api/v1/billing/track/batch"}
ADMIN = "cf_admin_bench_http_" + uuid.uuid4().hex
SATURATED = 0.85  # a client process busier than this share of one core was (near) the limit
CLIENT_SHARE = 0.5  # or the load generator used this share of all the CPU the run used (client + API + PostgreSQL)


# ------------------------------------------------------------------------------------------ the client


def _body(endpoint: str, rng: random.Random, key_prefix: str, i: int, batch_size: int) -> dict[str, Any]:
    """One request body: events alternate chat_message x1 and llm_tokens x50-2000 (as bench/metering.py)."""
    def event(j: int) -> dict[str, Any]:
        feature, value = ("chat_message", 1) if j % 2 == 0 else ("llm_tokens", rng.randint(50, 2000))
        return {"feature_id": feature, "value": value, "idempotency_key": f"{key_prefix}-{i}-{j}"}

    if endpoint == "track":
        return event(i)
    if endpoint == "check":
        return {"feature_id": "llm_tokens", "value": rng.randint(50, 2000)}
    return {"events": [event(j) for j in range(batch_size)]}


async def _client(cfg: dict[str, Any], barrier: Any, results: Any) -> None:
    import aiohttp
    import psutil

    rng = random.Random(cfg["seed"])
    secrets: list[str] = cfg["secrets"]
    endpoint, url = cfg["endpoint"], cfg["base_url"] + PATHS[cfg["endpoint"]]
    latencies: list[float] = []
    counts = {"requests": 0, "events": 0, "allowed": 0, "errors": 0, "warm_allowed": 0}
    errors: dict[str, int] = {}
    per_request = cfg["batch_size"] if endpoint == "batch" else (0 if endpoint == "check" else 1)
    connector = aiohttp.TCPConnector(limit=cfg["connections"], force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def one(i: int, timed: bool) -> None:
            body = _body(endpoint, rng, cfg["key_prefix"], i, cfg["batch_size"])
            headers = {"Authorization": f"Bearer {secrets[rng.randrange(len(secrets))]}"}
            t0 = time.perf_counter()
            async with session.post(url, json=body, headers=headers) as resp:
                data = await resp.json() if endpoint == "batch" else await resp.read()
                status = resp.status
            elapsed = time.perf_counter() - t0
            if status != 200:
                errors[str(status)] = errors.get(str(status), 0) + 1
            allowed = (data["allowed"] if status == 200 else 0) if endpoint == "batch" else \
                int(status == 200 and endpoint == "track")
            if not timed:
                counts["warm_allowed"] += allowed
                return
            latencies.append(elapsed)
            counts["requests"] += 1
            counts["events"] += per_request
            counts["allowed"] += allowed
            counts["errors"] += status != 200

        seq = iter(range(10**9))
        # Warm-up (untimed): open the keep-alive connections, fill the API's key cache and statement caches.
        await asyncio.gather(*(one(next(seq), False) for _ in range(cfg["connections"] * cfg["warmup"])))
        await asyncio.get_running_loop().run_in_executor(None, barrier.wait)
        me = psutil.Process()
        cpu0, start = me.cpu_times(), time.perf_counter()
        deadline = start + cfg["seconds"]

        async def worker() -> None:
            while time.perf_counter() < deadline:
                await one(next(seq), True)

        await asyncio.gather(*(worker() for _ in range(cfg["connections"])))
        wall, cpu1 = time.perf_counter() - start, me.cpu_times()
    results.put({**counts, "latencies": latencies, "wall": wall, "errors_by_status": errors,
                 "cpu": (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)})


def client_main(cfg: dict[str, Any], barrier: Any, results: Any) -> None:
    """One load-generator process (spawned): its share of the connections, for ``seconds``."""
    asyncio.run(_client(cfg, barrier, results))


# ------------------------------------------------------------------------------------------ the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and all its children (the API's uvicorn workers; PostgreSQL's backends)."""
    import psutil

    total = 0.0
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(pid)
        for proc in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                total += t.user + t.system
    return total


@contextlib.contextmanager
def api_server(database_url: str, workers: int) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``creditflow api`` on a free port (its logs to /dev/null, default settings otherwise): (base URL, process)."""
    import httpx

    port = free_port()
    env = {**os.environ, "CREDITFLOW_DATABASE_URL": database_url, "CREDITFLOW_ADMIN_API_KEY": ADMIN,
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    log = tempfile.TemporaryFile()  # noqa: SIM115  # its log lines cost what they cost in production; read on failure
    proc = subprocess.Popen(
        [sys.executable, "-c", "from creditflow.cli import app; app()", "api", "--host", "127.0.0.1", "--port",
         str(port), "--workers", str(workers)], env=env, stdout=subprocess.DEVNULL, stderr=log)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise SystemExit(f"creditflow api did not start ({proc.returncode}):\n{log.read().decode()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            time.sleep(0.3)
        yield base, proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


# ------------------------------------------------------------------------------------------ the phases


@dataclass
class HttpPhase:
    """One endpoint at one connection count."""

    endpoint: str
    connections: int
    client_processes: int
    requests: int
    events: int
    allowed: int
    errors: int
    errors_by_status: dict[str, int]
    seconds: float
    p50_ms: float
    p99_ms: float
    client_cpu_us: float  # load generator CPU per request (all its processes)
    client_busiest: float  # the busiest client process's CPU share of one core during the phase
    api_cpu_us: float  # the API processes' CPU per request
    server_cpu_us: float | None  # PostgreSQL's CPU per request (embedded server only)
    load_avg: float
    round: int = 0

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def events_per_s(self) -> float:
        return (self.events if self.endpoint != "check" else self.requests) / self.seconds if self.seconds else 0.0

    @property
    def client_share(self) -> float:
        """The load generator's share of the CPU used by client, API and PostgreSQL together."""
        total = self.client_cpu_us + self.api_cpu_us + (self.server_cpu_us or 0.0)
        return self.client_cpu_us / total if total else 0.0

    @property
    def client_bound(self) -> bool:
        return self.client_busiest >= SATURATED or self.client_share >= CLIENT_SHARE


def http_phase(endpoint: str, connections: int, args: argparse.Namespace, base: str, api_pid: int,
               secrets: list[str], run_id: str) -> tuple[HttpPhase, int]:
    """Spawn the client processes, release them together, collect: (phase, warm-up events allowed)."""
    from bench.metering import ServerCpu, percentile

    ctx = mp.get_context("spawn")
    n_procs = min(connections, args.client_processes)
    shares = [connections // n_procs + (i < connections % n_procs) for i in range(n_procs)]
    barrier, results = ctx.Barrier(n_procs + 1), ctx.Queue()
    procs = []
    for i, share in enumerate(shares):
        cfg = {"endpoint": endpoint, "base_url": base, "connections": share, "seconds": args.seconds,
               "warmup": args.warmup, "batch_size": args.batch_size, "secrets": secrets, "seed": args.seed + i,
               "key_prefix": f"{run_id}-{endpoint}-{connections}-{i}"}
        procs.append(ctx.Process(target=client_main, args=(cfg, barrier, results), daemon=True))
    for p in procs:
        p.start()
    barrier.wait(timeout=300)
    api0, pg0, load = tree_cpu(api_pid), ServerCpu.seconds(), os.getloadavg()[0]
    outs = [results.get(timeout=args.seconds + 300) for _ in procs]
    api1, pg1 = tree_cpu(api_pid), ServerCpu.seconds()
    for p in procs:
        p.join(30)
    ms = sorted(x * 1000 for o in outs for x in o["latencies"])
    requests = sum(o["requests"] for o in outs)
    wall = max(o["wall"] for o in outs)
    errors: dict[str, int] = {}
    for o in outs:
        for k, v in o["errors_by_status"].items():
            errors[k] = errors.get(k, 0) + v
    per = max(1, requests)
    phase = HttpPhase(
        endpoint=endpoint, connections=connections, client_processes=n_procs, requests=requests,
        events=sum(o["events"] for o in outs), allowed=sum(o["allowed"] for o in outs),
        errors=sum(o["errors"] for o in outs), errors_by_status=errors, seconds=wall,
        p50_ms=percentile(ms, 0.50), p99_ms=percentile(ms, 0.99),
        client_cpu_us=sum(o["cpu"] for o in outs) * 1e6 / per,
        client_busiest=max(o["cpu"] / o["wall"] for o in outs),
        api_cpu_us=(api1 - api0) * 1e6 / per,
        server_cpu_us=None if pg0 is None or pg1 is None else (pg1 - pg0) * 1e6 / per, load_avg=load)
    return phase, sum(o["warm_allowed"] for o in outs)


async def create_keys(url: str, ids: list[str]) -> list[str]:
    """One ``usage:write`` key per account (as a metering backend holds), through the library."""
    from creditflow.api.keys import Scope, create_key
    from creditflow.ledger.db import open_pool

    pool = open_pool(url, 1, 4)
    await pool.open()
    try:
        sem = asyncio.Semaphore(4)

        async def one(account: str) -> str:
            async with sem:
                return (await create_key(pool, account_id=account, scopes=[Scope.USAGE_WRITE], name="bench")).secret

        return list(await asyncio.gather(*(one(a) for a in ids)))
    finally:
        await pool.close()


async def library_track(url: str, ids: list[str], concurrency: int, events: int, seed: int, run_id: str) -> Any:
    """bench/metering.py's ``track`` phase (library call in this process, pool of ``concurrency``)."""
    from rich.progress import Progress

    from bench.metering import plan, track_phase
    from creditflow.ledger import metering
    from creditflow.ledger.coalescer import DEFAULT_WRITERS
    from creditflow.ledger.db import open_pool

    pool = open_pool(url, concurrency, concurrency)
    await pool.open()
    await pool.wait()
    metering.configure_track(pool, writers=DEFAULT_WRITERS)  # the API's default CREDITFLOW_TRACK_WRITERS
    try:
        with Progress(transient=True) as progress:
            warm = plan(min(200, events), len(ids), hot=False, seed=seed + 1)
            await track_phase(pool, "warm-up", "many accounts", warm, ids, f"{run_id}w", concurrency, progress)
            specs = plan(events, len(ids), hot=False, seed=seed)
            result = await track_phase(pool, "library track", "many accounts", specs, ids, run_id, concurrency,
                                       progress)
        return result, len(warm)
    finally:
        await pool.close()


# ---------------------------------------------------------------------------------------------- report


@dataclass
class Report:
    machine: dict[str, Any]
    config: dict[str, Any]
    phases: list[HttpPhase] = field(default_factory=list)
    library: list[dict[str, Any]] = field(default_factory=list)  # library track figures (round, connections)
    ratios: dict[int, list[float]] = field(default_factory=dict)  # connections -> HTTP/library track, per round
    goals: dict[str, dict[str, Any]] = field(default_factory=dict)
    verification: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for p, raw in zip(self.phases, data["phases"], strict=True):
            raw.update(events_per_s=round(p.events_per_s, 1), requests_per_s=round(p.requests_per_s, 1),
                       client_share=round(p.client_share, 3), client_bound=p.client_bound)
        return data


def median_range(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def evaluate(report: Report) -> None:
    """Per connection count, HTTP/library in each round; the goals take the best connection count's median."""
    track = {(p.round, p.connections): p for p in report.phases if p.endpoint == "track"}
    report.ratios = {}
    for lib in report.library:
        http = track.get((lib["round"], lib["connections"]))
        if http is not None and lib["events_per_s"]:
            report.ratios.setdefault(lib["connections"], []).append(http.events_per_s / lib["events_per_s"])
    batch: dict[int, list[float]] = {}
    for p in report.phases:
        if p.endpoint == "batch":
            batch.setdefault(p.connections, []).append(p.events_per_s)
    ratio = max((median_range(v) for v in report.ratios.values()), default=(0.0, 0.0, 0.0))
    best_batch = max((median_range(v) for v in batch.values()), default=(0.0, 0.0, 0.0))
    report.goals = {
        "HTTP track >= 0.5 x library track (best connection count)": {
            "target": 0.5, "actual": round(ratio[0], 3), "min": round(ratio[1], 3), "max": round(ratio[2], 3),
            "met": ratio[0] >= 0.5},
        "HTTP batch >= 10,000 events/s": {"target": 10_000, "actual": round(best_batch[0]), "min": round(best_batch[1]),
                                          "max": round(best_batch[2]), "met": best_batch[0] >= 10_000},
    }


def render(report: Report, out: Any) -> None:
    from rich.table import Table

    m, c = report.machine, report.config
    out.print(f"[bold]creditflow HTTP benchmark[/bold]  {m['when']}")
    out.print(f"machine: {m['cores']} cores ({m['cpu']}), {m['platform']}, Python {m['python']}; "
              f"PostgreSQL {m.get('postgres', '?')} via {m['server']}")
    out.print(f"creditflow api: {c['api_workers']} process(es), default settings; {c['accounts']:,} accounts, one "
              f"usage:write key each (requests pick one at random); {c['seconds']} s per phase after "
              f"{c['warmup']} warm-up requests per connection; batch size {c['batch_size']}; up to "
              f"{c['client_processes']} client processes (aiohttp, keep-alive)")
    table = Table(title="HTTP (latency per request; check: events/s = checks/s)")
    for col in ("round", "endpoint", "conns", "client procs", "requests", "events/s", "p50 ms", "p99 ms", "errors",
                "client CPU us/req", "busiest client", "client share", "API CPU us/req", "PG CPU us/req", "load",
                "limit"):
        table.add_column(col, justify="left" if col in ("endpoint", "limit") else "right")
    for p in report.phases:
        table.add_row(str(p.round), p.endpoint, str(p.connections), str(p.client_processes), f"{p.requests:,}",
                      f"{p.events_per_s:,.0f}", f"{p.p50_ms:.2f}", f"{p.p99_ms:.2f}",
                      str(p.errors) + (f" {p.errors_by_status}" if p.errors else ""),
                      f"{p.client_cpu_us:.0f}", f"{p.client_busiest:.0%}", f"{p.client_share:.0%}",
                      f"{p.api_cpu_us:.0f}",
                      "n/a" if p.server_cpu_us is None else f"{p.server_cpu_us:.0f}", f"{p.load_avg:.2f}",
                      "[red]client[/red]" if p.client_bound else "server")
    out.print(table)
    lib = Table(title="library-level metering.track (bench/metering.py's track phase, same round) and HTTP/library")
    for col in ("round", "callers", "events/s", "p50 ms", "p99 ms", "HTTP track events/s", "HTTP / library"):
        lib.add_column(col, justify="right")
    track = {(p.round, p.connections): p for p in report.phases if p.endpoint == "track"}
    for v in report.library:
        http = track.get((v["round"], v["connections"]))
        lib.add_row(str(v["round"]), str(v["connections"]), f"{v['events_per_s']:,.0f}", f"{v['p50_ms']:.2f}",
                    f"{v['p99_ms']:.2f}", f"{http.events_per_s:,.0f}" if http else "-",
                    f"{http.events_per_s / v['events_per_s']:.2f}" if http and v["events_per_s"] else "-")
    out.print(lib)
    for conns, ratios in report.ratios.items():
        med, lo, hi = median_range(ratios)
        out.print(f"HTTP / library track at {conns} connections: median {med:.2f} ({lo:.2f}-{hi:.2f}) over "
                  f"{len(ratios)} round(s)")
    from bench.metering import goals_table

    out.print(goals_table("goals (issue 16, section 3)", report.goals))
    out.print(f"'limit: client' means a load-generator process used at least {SATURATED:.0%} of a core, or the load "
              f"generator at least {CLIENT_SHARE:.0%} of the CPU the run used: that row measures the client, not "
              "creditflow. 'load' is the 1-minute load average at the phase's start: above the core count, other work "
              "shared the machine and no figure is trustworthy.")
    v = report.verification
    out.print(f"verification: {'[green]OK[/green]' if v['ok'] else '[red]FAILED[/red]'} - usage items "
              f"{v['usage_items']:,} (expected {v['expected_usage_items']:,}), sum of all entries "
              f"{v['sum_of_all_entries']}, unbalanced {v['unbalanced_transactions']}, balances != entries "
              f"{v['balances_not_equal_to_entries']}, balances != lots {v['balances_not_equal_to_lots']}")


# ------------------------------------------------------------------------------------------------ main


async def _setup(url: str, args: argparse.Namespace) -> tuple[list[str], list[str]]:
    from rich.console import Console
    from rich.progress import Progress

    from bench.metering import setup_accounts

    with Progress(console=Console(stderr=True), transient=True) as progress:
        ids = await setup_accounts(url, args.accounts, "bulk", 4, progress)
    return ids, await create_keys(url, ids)


def run(args: argparse.Namespace, server_url: str, server_desc: str) -> Report:
    import psycopg
    from rich.console import Console

    from bench.metering import create_database, drop_database, machine_info, verify

    console = Console(stderr=True)
    url, db_name = create_database(server_url)
    run_id = uuid.uuid4().hex[:8]
    try:
        machine = machine_info()
        with psycopg.connect(url) as conn:
            machine["postgres"] = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
        machine["server"] = server_desc
        ids, secrets = asyncio.run(_setup(url, args))
        report = Report(machine=machine, config={
            "connections": args.connections, "api_workers": args.api_workers, "accounts": len(ids),
            "seconds": args.seconds, "warmup": args.warmup, "batch_size": args.batch_size,
            "client_processes": args.client_processes, "library_events": args.library_events, "seed": args.seed,
            "rounds": args.rounds})
        expected_usage = 0
        with api_server(url, args.api_workers) as (base, api):
            for r in range(args.rounds):
                for conns in args.connections:
                    def library(r: int = r, conns: int = conns) -> int:
                        console.print(f"round {r + 1}/{args.rounds}: library track at {conns} callers")
                        lib, warm = asyncio.run(library_track(url, ids, conns, args.library_events,
                                                              args.seed + conns + 1000 * r,
                                                              f"{run_id}-r{r}-lib{conns}"))
                        report.library.append({"round": r, "connections": conns, "events_per_s": lib.events_per_s,
                                               "p50_ms": lib.p50_ms, "p99_ms": lib.p99_ms,
                                               "client_cpu_us": lib.client_cpu_us})
                        return lib.allowed + warm

                    def http(r: int = r, conns: int = conns) -> int:
                        allowed = 0
                        for endpoint in args.endpoints:
                            console.print(f"round {r + 1}/{args.rounds}: HTTP {endpoint} at {conns} connections")
                            phase, warm_allowed = http_phase(endpoint, conns, args, base, api.pid, secrets,
                                                             f"{run_id}-r{r}")
                            phase.round = r
                            report.phases.append(phase)
                            allowed += phase.allowed + warm_allowed
                        return allowed

                    for step in ((library, http) if r % 2 == 0 else (http, library)):
                        expected_usage += step()
        report.verification = asyncio.run(verify(url, expected_usage, 0, expected_usage))
        evaluate(report)
        return report
    finally:
        drop_database(server_url, db_name)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--connections", type=int, nargs="+", default=[1, 8, 32], help="connection counts to measure")
    p.add_argument("--endpoints", nargs="+", choices=ENDPOINTS, default=list(ENDPOINTS))
    p.add_argument("--seconds", type=float, default=10.0, help="timed seconds per HTTP phase")
    p.add_argument("--warmup", type=int, default=20, help="untimed requests per connection before each phase")
    p.add_argument("--batch-size", type=int, default=100, help="events per /track/batch request")
    p.add_argument("--accounts", type=int, default=1_000, help="accounts (and keys) the load spreads over")
    p.add_argument("--api-workers", type=int, default=1, help="creditflow api --workers")
    p.add_argument("--client-processes", type=int, default=4, help="load-generator processes (at most one per "
                   "connection)")
    p.add_argument("--library-events", type=int, default=10_000, help="events of the library track phase")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--rounds", type=int, default=3, help="rounds of every phase (ratios: median and range)")
    p.add_argument("--quick", action="store_true", help="short run: 2 s per phase, 2,000 library events")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON ('-' for stdout)")
    args = p.parse_args(argv)
    if args.quick:
        args.seconds, args.library_events = min(args.seconds, 2.0), min(args.library_events, 2_000)
        args.warmup = min(args.warmup, 10)
    if min(*args.connections, args.batch_size, args.accounts, args.api_workers, args.client_processes,
           args.library_events, args.rounds) < 1 or args.seconds <= 0:
        p.error("counts and --seconds must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    from bench.metering import postgres_server

    args = parse_args(argv)
    with postgres_server() as (server_url, desc):
        report = run(args, server_url, desc)
    render(report, Console(width=160, stderr=args.json == "-"))
    if args.json:
        from bench.metering import write_json

        write_json(report.to_json(), args.json)
    return 0 if report.verification["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
