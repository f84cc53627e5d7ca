"""PostgreSQL's own CPU per tracked event, for a change to the ledger's SQL: database A as migrated, database B
with ``--patch FILE`` applied, interleaved.

Both databases are made by bench/metering.py's setup (fresh, migrated, funded accounts) in one embedded server (or
``CREDITFLOW_DATABASE_URL``). Each round sends ``--events`` events to A and to B (B first every other round) as the
coalescer sends them: ``cf_track_group`` groups of 4 (``--hot``: all on one account), first attempt without the key
probe, autocommit, one connection per database. The figure is the CPU time of that connection's backend process
(``/proc/PID/stat``: user + system, the commit's WAL flush included) per event, median (min-max) over the rounds:
steadier than wall time on a busy machine, though not immune to it. Run it on the machine the server runs on.

    python bench/server_cpu.py --patch change.sql [--rounds 8] [--events 2000] [--accounts 2000] [--hot]

Example (issue 16): the journal trigger that migration 0042 dropped, re-created on B, costs what B pays more.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `bench.metering` when run as a script

_GROUP = ("SELECT * FROM cf_track_group(%b::text[], %b::text[], %b::numeric[], %b::text[], %b::text[], %b::bytea[],"
          " %b::jsonb[], false)")


def backend_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by one backend process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def track_events(conn: object, pid: int, ids: list[str], n: int, tag: str, hot: bool) -> float:
    """``n`` events in groups of 4: the backend's CPU microseconds per event."""
    before, k = backend_cpu(pid), 0
    for _ in range(n // 4):
        accounts = sorted([ids[0]] * 4 if hot else [ids[(k + j) * 7919 % len(ids)] for j in range(4)])
        conn.execute(_GROUP, (accounts, ["chat_message"] * 4, [1] * 4, None, [f"{tag}-{k + j}" for j in range(4)],  # type: ignore[attr-defined]
                              [b"\x01"] * 4, None))
        k += 4
    return (backend_cpu(pid) - before) / n * 1e6


def main(argv: list[str] | None = None) -> None:
    import psycopg
    from rich.progress import Progress

    from bench.metering import create_database, drop_database, postgres_server, setup_accounts

    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--patch", type=Path, help="SQL applied to database B (none: an A/A run, to see the noise)")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--events", type=int, default=2000, help="events per database and round")
    p.add_argument("--accounts", type=int, default=2000)
    p.add_argument("--hot", action="store_true", help="every event on one account")
    args = p.parse_args(argv)
    with postgres_server() as (server, desc):
        made, dbs = [], {}
        try:
            for name in ("A", "B"):
                url, db_name = create_database(server)
                made.append(db_name)
                with Progress(transient=True) as progress:
                    ids = asyncio.run(setup_accounts(url, args.accounts, "bulk", 2, progress))
                conn = psycopg.connect(url, autocommit=True)
                if name == "B" and args.patch:
                    conn.execute(args.patch.read_text())  # type: ignore[call-overload]
                pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
                track_events(conn, pid, ids, 800, f"warm-{uuid.uuid4().hex[:8]}", args.hot)
                dbs[name] = (conn, pid, ids)
            per: dict[str, list[float]] = {"A": [], "B": []}
            for r in range(args.rounds):
                for name in ("A", "B") if r % 2 == 0 else ("B", "A"):
                    conn, pid, ids = dbs[name]
                    per[name].append(track_events(conn, pid, ids, args.events, f"r{r}-{uuid.uuid4().hex[:8]}",
                                                  args.hot))
        finally:
            for conn, _, _ in dbs.values():
                conn.close()
            for db_name in made:
                drop_database(server, db_name)
    print(f"{desc}; load average {os.getloadavg()[0]:.2f}; {args.rounds} rounds of {args.events:,} events "
          f"({'one hot account' if args.hot else f'{args.accounts:,} accounts'})")
    for name, values in per.items():
        label = "A (as migrated)" if name == "A" else f"B ({args.patch or 'as migrated'})"
        print(f"{label}: backend CPU {statistics.median(values):.1f} us per event "
              f"({min(values):.1f}-{max(values):.1f})")


if __name__ == "__main__":
    main()
