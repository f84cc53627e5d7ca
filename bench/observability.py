"""What observability costs on the hot path: ``POST /api/v1/billing/track`` through the real app, with and without
the access log, request metrics and usage counters (JSON log lines written to /dev/null).

    .venv/bin/python bench/observability.py [--requests 2000] [--rounds 3]

Sequential requests through the ASGI app in process (httpx's ASGITransport: no sockets, so the figure is the
app's own time per request: validation, auth, the ``cf_track`` round trip and what observability adds), on the
embedded PostgreSQL (or ``CREDITFLOW_DATABASE_URL``), alternating rounds of each configuration so that drift
(cache, autovacuum) hits both alike. Also prints the cost of the pieces alone (counters, one log line).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import statistics
import sys
import time
import timeit
import uuid
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.metering import create_database, drop_database, postgres_server  # noqa: E402
from creditflow.api import app as app_module  # noqa: E402
from creditflow.config import Settings  # noqa: E402
from creditflow.ledger import metering  # noqa: E402
from creditflow.ledger.bootstrap import prepare_database  # noqa: E402
from creditflow.observability import asgi, logs  # noqa: E402
from creditflow.observability.metrics import record_usage  # noqa: E402

ADMIN = "cf_admin_bench_observability_key"


class _Passthrough:
    def __init__(self, app: object) -> None:
        self.app = app

    async def __call__(self, scope: object, receive: object, send: object) -> None:
        await self.app(scope, receive, send)  # type: ignore[operator]


async def _round(settings: Settings, requests: int, observed: bool) -> tuple[float, float]:
    """(wall, CPU of this process) microseconds per track request in one configuration. The CPU figure is the
    app's own work (PostgreSQL runs in other processes), steady even on a busy machine."""
    if observed:
        app_module.AccessLogMiddleware = asgi.AccessLogMiddleware  # type: ignore[attr-defined]
        metering.record_usage = record_usage  # type: ignore[attr-defined]
        logs.configure_logging("INFO", "json", open("/dev/null", "w"))  # noqa: SIM115
    else:
        app_module.AccessLogMiddleware = _Passthrough  # type: ignore[attr-defined,assignment]
        metering.record_usage = lambda *a: None  # type: ignore[attr-defined]
        logging.getLogger().handlers.clear()
        logging.getLogger().setLevel(logging.WARNING)
    app = app_module.create_app(settings)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://bench",
            headers={"Authorization": f"Bearer {ADMIN}"}) as client:
        account = (await client.post("/api/v1/accounts", json={"name": "b", "billing_email": "b@example.com"})).json()
        tag = uuid.uuid4().hex
        for i in range(50):  # warm-up
            await client.post("/api/v1/billing/track", json={"account_id": account["id"], "feature_id": "chat_message",
                                                             "value": 1, "idempotency_key": f"w-{tag}-{i}"})
        started, cpu = time.perf_counter(), time.process_time()
        for i in range(requests):
            resp = await client.post("/api/v1/billing/track", json={
                "account_id": account["id"], "feature_id": "chat_message", "value": 1,
                "idempotency_key": f"{tag}-{i}"})
            assert resp.status_code == 200, resp.text
        return ((time.perf_counter() - started) / requests * 1e6, (time.process_time() - cpu) / requests * 1e6)


def pieces() -> dict[str, float]:
    """Microseconds per call of each added piece, alone."""
    n = 200_000
    counters = timeit.timeit(lambda: record_usage(True, "ok", 1_000_000, False), number=n) / n * 1e6
    logger = logging.getLogger("creditflow.access")
    logs.configure_logging("INFO", "json", io.StringIO())
    m = 20_000
    line = timeit.timeit(lambda: logger.info("%s %s %d %.1fms", "POST", "/api/v1/billing/track", 200, 1.2,
                                             extra={"route": "/api/v1/billing/track", "status": 200,
                                                    "duration_ms": 1.2}), number=m) / m * 1e6
    return {"usage counters (record_usage)": counters, "one JSON access-log line": line}


async def main(args: argparse.Namespace) -> None:
    with postgres_server() as (server_url, desc):
        url, name = create_database(server_url)
        await asyncio.to_thread(prepare_database, url)  # the default rate card
        try:
            settings = Settings(database_url=url, admin_api_key=ADMIN,  # type: ignore[arg-type]
                                welcome_bonus_credits=10_000_000)
            results: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
            for _ in range(args.rounds):
                for observed in (False, True):
                    results[observed].append(await _round(settings, args.requests, observed))
        finally:
            drop_database(server_url, name)
    print(f"server: {desc}; {args.rounds} rounds x {args.requests} sequential POST /api/v1/billing/track")
    for i, what in ((0, "wall"), (1, "app CPU")):
        off = statistics.median(r[i] for r in results[False])
        on = statistics.median(r[i] for r in results[True])
        print(f"  {what:>7}: without {off:8.1f} us/request, with {on:8.1f} us/request, added {on - off:+.1f} us "
              f"({(on - off) / off * 100:+.1f}%)  rounds off {[round(r[i]) for r in results[False]]} "
              f"on {[round(r[i]) for r in results[True]]}")
    for piece, us in pieces().items():
        print(f"  {piece}: {us:.2f} us")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    asyncio.run(main(parser.parse_args()))
