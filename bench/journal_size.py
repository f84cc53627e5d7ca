"""Server-side cost of ``cf_track`` on two journals of different sizes, interleaved (docs/partitioning.md).

Each database is one that ``python -m bench.metering --keep-db --preload-journal N`` left behind. Per round and
database: N events through ``cf_track`` in one statement (no client round trip, no commit: the function's own work,
its journal row and key), the same keys again with the probe (the replay path: ``cf_journal_entry``), and 500
history reads (an account's latest 50 entries). The databases alternate, in reversed order every other round, so a
drift of the machine falls on both; the medians (min, max) are printed in microseconds per event or read.

    python -m bench.journal_size URL_SMALL URL_LARGE [--rounds 10] [--events 2000]
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid

import psycopg

_TRACK = ("SELECT count(*) FROM (SELECT cf_track((%(ids)s::text[])[1 + (g * 7919) %% cardinality(%(ids)s::text[])],"
          " 'chat_message', 1, NULL, %(prefix)s || g, '\\x01'::bytea, NULL, %(probe)s)"
          " FROM generate_series(1, %(n)s) g) x")
_HISTORY = ("SELECT count(*) FROM (SELECT * FROM journal WHERE account_id = %s"
            " ORDER BY created_at DESC, seq DESC LIMIT 50) x")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("small")
    p.add_argument("large")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--events", type=int, default=2000)
    args = p.parse_args(argv)
    urls = {"small": args.small, "large": args.large}
    conns = {name: psycopg.connect(url, autocommit=True) for name, url in urls.items()}
    ids: dict[str, list[str]] = {}
    for name, conn in conns.items():
        ids[name] = [r[0] for r in conn.execute("SELECT account_id FROM balances ORDER BY account_id").fetchall()]
        rows = conn.execute("SELECT count(*) FROM journal").fetchone()
        print(f"{name}: {rows[0] if rows else 0:,} journal rows, {len(ids[name]):,} accounts")
    results: dict[str, dict[str, list[float]]] = {n: {"track": [], "replay": [], "history": []} for n in conns}
    for r in range(args.rounds):
        for name in (("small", "large") if r % 2 == 0 else ("large", "small")):
            conn, prefix = conns[name], f"journal-size-{uuid.uuid4().hex[:8]}-"
            for what, probe in (("track", False), ("replay", True)):
                t = time.perf_counter()
                conn.execute(_TRACK, {"ids": ids[name], "prefix": prefix, "n": args.events, "probe": probe})
                results[name][what].append((time.perf_counter() - t) / args.events * 1e6)
            t = time.perf_counter()
            for account in ids[name][:500]:
                conn.execute(_HISTORY, (account,))
            results[name]["history"].append((time.perf_counter() - t) / 500 * 1e6)
    for name, by in results.items():
        print(name, "  ".join(f"{what} {statistics.median(v):.0f} us ({min(v):.0f}-{max(v):.0f})"
                              for what, v in by.items()))


if __name__ == "__main__":
    main()
