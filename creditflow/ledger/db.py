"""Connections, pools and migrations for the ledger database."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_random_exponential

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"

T = TypeVar("T")

# Serialization failures and deadlocks are retried inside the library, never surfaced to callers.
RETRYABLE = (psycopg.errors.SerializationFailure, psycopg.errors.DeadlockDetected)


async def with_retry(fn: Callable[[], Awaitable[T]], attempts: int = 5) -> T:
    async for attempt in AsyncRetrying(
        retry=retry_if_exception_type(RETRYABLE),
        stop=stop_after_attempt(attempts),
        wait=wait_random_exponential(multiplier=0.005, max=0.2),
        reraise=True,
    ):
        with attempt:
            return await fn()
    raise AssertionError("unreachable")


def open_pool(database_url: str, min_size: int = 2, max_size: int = 20) -> AsyncConnectionPool:
    """An async pool (not yet opened: ``await pool.open()``); rows come back as dicts."""
    return AsyncConnectionPool(
        database_url,
        min_size=min_size,
        max_size=max_size,
        kwargs={"row_factory": dict_row, "autocommit": True, "prepare_threshold": 0},
        open=False,
        name="creditflow",
    )


def _yoyo_url(database_url: str) -> str:
    """yoyo names the psycopg 3 backend ``postgresql+psycopg``."""
    parts = urlsplit(database_url)
    scheme = "postgresql+psycopg" if parts.scheme in ("postgres", "postgresql") else parts.scheme
    return urlunsplit((scheme, parts.netloc, parts.path, parts.query, parts.fragment))


def migrate(database_url: str) -> list[str]:
    """Apply pending migrations (yoyo, versioned SQL files); returns the ids applied."""
    from yoyo import get_backend, read_migrations

    backend = get_backend(_yoyo_url(database_url))
    migrations = read_migrations(str(MIGRATIONS_DIR))
    try:
        with backend.lock():
            pending = backend.to_apply(migrations)
            backend.apply_migrations(pending)
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
