"""The API's own CPU per request: ``track`` / ``check`` / ``track/batch`` called on the ASGI app directly.

No HTTP client and no server in this process (the ASGI messages are built by hand), so ``time.process_time()`` per
request is the app's work: routing, dependencies (authentication), validation, the ledger call's client side,
the JSON answer, the access log line (JSON, to /dev/null) and the metrics. PostgreSQL runs in other processes (the
embedded server, or ``CREDITFLOW_DATABASE_URL``). CPU time is steadier than wall time on a busy machine, but not
immune: compare runs made under the same load.

    .venv/bin/python bench/app_cpu.py [--endpoint track|check|batch] [--requests 2000] [--concurrency 8]
                                      [--rounds 3] [--compare-fast-path]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `bench.metering` when run as a script

ADMIN = "cf_admin_bench_app_cpu_" + uuid.uuid4().hex
PATHS = {"track": "/api/v1/billing/track", "check": "/api/v1/billing/check", "batch": "/api/v1/billing/track/batch"}


async def call(app: Any, path: str, body: Any) -> tuple[int, bytes]:
    """One POST through the ASGI app: (status, body)."""
    raw = json.dumps(body).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"bench"), (b"content-type", b"application/json"),
                         (b"authorization", f"Bearer {ADMIN}".encode()), (b"content-length", str(len(raw)).encode())],
             "client": ("127.0.0.1", 1234), "server": ("bench", 80), "state": {}}
    received = False
    out: dict[str, Any] = {"body": b""}

    async def receive() -> dict[str, Any]:
        nonlocal received
        if not received:
            received = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await asyncio.Event().wait()  # the client never disconnects
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            out["status"] = message["status"]
        elif message["type"] == "http.response.body":
            out["body"] += message.get("body", b"")

    await app(scope, receive, send)
    return out["status"], out["body"]


async def main(args: argparse.Namespace) -> None:
    from bench.metering import create_database, drop_database, postgres_server
    from creditflow.api import app as app_module
    from creditflow.config import Settings
    from creditflow.ledger.bootstrap import prepare_database
    from creditflow.observability import logs

    logs.configure_logging("INFO", "json", open("/dev/null", "w"))  # noqa: SIM115 - as in production, not shown
    with postgres_server() as (server_url, desc):
        url, name = create_database(server_url)
        await asyncio.to_thread(prepare_database, url)
        try:
            settings = Settings(database_url=url, admin_api_key=ADMIN,  # type: ignore[arg-type]
                                welcome_bonus_credits=10_000_000)
            app = app_module.create_app(settings)
            async with app.router.lifespan_context(app):
                status, raw = await call(app, "/api/v1/accounts", {"name": "bench", "billing_email": "b@example.com"})
                assert status == 201, raw
                account, tag = json.loads(raw)["id"], uuid.uuid4().hex

                def body(i: object) -> dict[str, Any]:
                    event = {"account_id": account, "feature_id": "chat_message", "value": 1}
                    if args.endpoint == "check":
                        return event
                    if args.endpoint == "track":
                        return {**event, "idempotency_key": f"{tag}-{i}"}
                    return {"events": [{**event, "idempotency_key": f"{tag}-{i}-{j}"} for j in range(args.batch_size)]}

                async def caller(first: int, count: int) -> None:
                    for i in range(first, count, args.concurrency):
                        status, raw = await call(app, PATHS[args.endpoint], body(i))
                        assert status == 200, raw

                await caller(0, min(50, args.requests))  # warm-up: routes, prepared statements, the key cache
                modes = ["fast path", "no fast path"] if args.compare_fast_path else ["as configured"]
                figures: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
                first = args.requests
                for r in range(args.rounds):
                    for mode in (modes if r % 2 == 0 else modes[::-1]):
                        with fast_path_removed(mode == "no fast path"):
                            started, cpu = time.perf_counter(), time.process_time()
                            await asyncio.gather(*(caller(first + k, first + args.requests)
                                                   for k in range(args.concurrency)))
                            figures[mode].append((time.process_time() - cpu, time.perf_counter() - started))
                        first += args.requests
        finally:
            drop_database(server_url, name)
    per = "request" if args.endpoint != "batch" else f"request of {args.batch_size} events"
    print(desc)
    for mode, runs in figures.items():
        cpus = [used / args.requests * 1e6 for used, _ in runs]
        walls = [wall / args.requests * 1e6 for _, wall in runs]
        print(f"{args.endpoint} ({mode}): {args.requests} requests x {args.rounds} round(s), {args.concurrency} "
              f"concurrent callers: app CPU median {statistics.median(cpus):,.0f} us per {per} "
              f"({min(cpus):,.0f}-{max(cpus):,.0f}), wall {statistics.median(walls):,.0f} us")


@contextlib.contextmanager
def fast_path_removed(removed: bool) -> Iterator[None]:
    """The metering routes without their fast path (creditflow/api/fast_path.py) while inside, to compare."""
    from creditflow.api import billing

    saved = {e: e.fast_path for e in (billing.track, billing.track_batch, billing.check)}  # type: ignore[attr-defined]
    try:
        if removed:
            for endpoint in saved:
                del endpoint.fast_path  # type: ignore[attr-defined]
        yield
    finally:
        for endpoint, fast in saved.items():
            endpoint.fast_path = fast  # type: ignore[attr-defined]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--endpoint", choices=sorted(PATHS), default="track")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=1, help="timed rounds (median and range are printed)")
    parser.add_argument("--compare-fast-path", action="store_true",
                        help="alternate rounds with and without the metering routes' fast path")
    return parser.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
