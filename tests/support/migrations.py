"""Databases for migration tests: an empty one, and one with the numbered migrations only (as a release left it)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

from creditflow.ledger.db import MIGRATIONS_DIR, _yoyo_url, with_database


@contextmanager
def new_database(pg_server_url: str) -> Iterator[str]:
    name = f"m_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")  # type: ignore[arg-type]
    try:
        yield with_database(pg_server_url, name)
    finally:
        with psycopg.connect(pg_server_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")  # type: ignore[arg-type]


def apply_numbered(url: str, through: str | None = None) -> list[str]:
    """The numbered migrations only (through one of them, or all): a database as an older release left it."""
    from yoyo import get_backend, read_migrations

    backend = get_backend(_yoyo_url(url))
    migrations = read_migrations(str(MIGRATIONS_DIR))
    chosen = migrations.filter(lambda m: through is None or m.id <= through)
    try:
        with backend.lock():
            backend.apply_migrations_only(backend.to_apply(chosen))
    finally:
        backend.connection.close()
    return [m.id for m in chosen]
