"""Connections, pools and migrations for the ledger database."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import psycopg
import simplejson
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb, set_json_loads
from psycopg_pool import AsyncConnectionPool
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_random_exponential

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
FUNCTIONS_DIR = Path(__file__).parent / "functions"
# Serializes concurrent applications of functions/ (concurrent CREATE OR REPLACE of one function fails).
_FUNCTIONS_LOCK = 0x63665F66756E63  # "cf_func"

T = TypeVar("T")

# Serialization failures and deadlocks are retried inside the library, never surfaced to callers.
RETRYABLE: tuple[type[Exception], ...] = (psycopg.errors.SerializationFailure, psycopg.errors.DeadlockDetected)


async def with_retry(fn: Callable[[], Awaitable[T]], attempts: int = 5,
                     retry_on: tuple[type[Exception], ...] = RETRYABLE) -> T:
    async for attempt in AsyncRetrying(
        retry=retry_if_exception_type(retry_on),
        stop=stop_after_attempt(attempts),
        wait=wait_random_exponential(multiplier=0.005, max=0.2),
        reraise=True,
    ):
        with attempt:
            return await fn()
    raise AssertionError("unreachable")


def _exact_json_loads(data: str | bytes) -> Any:
    return json.loads(data, parse_float=Decimal)


def _dump_json(obj: Any) -> str:
    return simplejson.dumps(obj, use_decimal=True, separators=(",", ":"))


def to_jsonb(obj: dict[str, Any] | None) -> Jsonb | None:
    """JSON for the database, Decimals written exactly; empty objects are stored as NULL."""
    return Jsonb(obj, dumps=_dump_json) if obj else None


async def _configure(conn: psycopg.AsyncConnection[Any]) -> None:
    # JSON numbers read back from jsonb (metadata) stay exact.
    set_json_loads(_exact_json_loads, conn)


def open_pool(database_url: str, min_size: int = 2, max_size: int = 20) -> AsyncConnectionPool:
    """An async pool (not yet opened: ``await pool.open()``); rows come back as dicts; every
    statement is its own transaction unless wrapped in ``conn.transaction()``."""
    return AsyncConnectionPool(
        database_url,
        min_size=min_size,
        max_size=max_size,
        kwargs={"row_factory": dict_row, "autocommit": True, "prepare_threshold": 0},
        configure=_configure,
        open=False,
        name="creditflow",
    )


def _yoyo_url(database_url: str) -> str:
    """yoyo names the psycopg 3 backend ``postgresql+psycopg``."""
    parts = urlsplit(database_url)
    scheme = "postgresql+psycopg" if parts.scheme in ("postgres", "postgresql") else parts.scheme
    return urlunsplit((scheme, parts.netloc, parts.path, parts.query, parts.fragment))


def apply_functions(database_url: str) -> list[str]:
    """Apply every function's current definition (functions/*.sql, in FUNCTION_FILES order) in one
    transaction; returns the files applied. Idempotent: each file is CREATE OR REPLACE only.

    Run after the numbered migrations every time, not as a yoyo post-apply hook: yoyo runs those only when a
    migration was pending, so a change to a function alone would never reach an up-to-date database."""
    from creditflow.ledger.functions_check import FUNCTION_FILES

    with psycopg.connect(database_url, autocommit=True) as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_FUNCTIONS_LOCK,))
        for name in FUNCTION_FILES:
            conn.execute((FUNCTIONS_DIR / name).read_text())  # type: ignore[arg-type]  # a file, not user input
    return list(FUNCTION_FILES)


def migrate(database_url: str) -> list[str]:
    """Apply pending migrations (yoyo, versioned SQL files: tables, types, triggers, data), then every
    function's current definition (functions/); returns the migration ids applied."""
    from yoyo import get_backend, read_migrations

    backend = get_backend(_yoyo_url(database_url))
    migrations = read_migrations(str(MIGRATIONS_DIR))
    try:
        with backend.lock():
            pending = backend.to_apply(migrations)
            backend.apply_migrations(pending)
            apply_functions(database_url)
    finally:
        backend.connection.close()
    applied = [m.id for m in pending]
    if applied:
        log.info("applied migrations: %s", ", ".join(applied))
    return applied


def with_database(database_url: str, name: str) -> str:
    """The same server URL pointing at another database."""
    parts = urlsplit(database_url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))
