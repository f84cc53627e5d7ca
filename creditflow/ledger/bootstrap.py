"""Bring a database up to date: the one routine behind `creditflow migrate` and `creditflow dev`."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from creditflow.ledger.db import migrate, open_pool
from creditflow.ledger.ratecard import ensure_default_ratecard


@dataclass(frozen=True)
class PrepareResult:
    applied: list[str]
    ratecard_seeded: bool


async def _seed(database_url: str, ratecard_path: Path | None) -> bool:
    pool = open_pool(database_url, 1, 2)
    await pool.open()
    try:
        return await ensure_default_ratecard(pool, ratecard_path)
    finally:
        await pool.close()


def prepare_database(database_url: str, ratecard_path: Path | None = None) -> PrepareResult:
    """Apply pending migrations, then seed the rate card on a fresh database.

    Synchronous on purpose: callers are CLI commands that own no event loop yet."""
    applied = migrate(database_url)
    seeded = asyncio.run(_seed(database_url, ratecard_path))
    return PrepareResult(applied=applied, ratecard_seeded=seeded)
