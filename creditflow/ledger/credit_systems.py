"""Named credit systems (seed 003): balances of their own beside the default wallet (``credits``).

An account's balance in a system other than the default lives in a ledger sub-account (migration 0032): an
``accounts`` row with ``parent_account_id`` and ``credit_system_id``, id ``<account id>.<system id>``, with its own
balances row, lots, journal and holds. The ledger's functions and invariants then hold per system unchanged; this
module only says which (sub-)account a feature's usage goes to, creates sub-accounts when credits are first granted
into them, and reports their balances.

Which system a feature draws on is fixed when the feature is created, so each API process caches it per pool: the
metering hot path pays a dict lookup, no query, for every feature it has seen once.
"""

from __future__ import annotations

import re
import weakref
from typing import Any

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel

from creditflow.errors import CreditflowError
from creditflow.ledger.models import Balances

DEFAULT_SYSTEM = "credits"
_SYSTEM_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")

# pool -> {feature id -> its credit system}; only features that exist are cached (their system never changes).
_feature_systems: weakref.WeakKeyDictionary[AsyncConnectionPool, dict[str, str]] = weakref.WeakKeyDictionary()


class CreditSystem(BaseModel):
    id: str
    name: str
    default: bool
    features: list[str]


class SystemBalance(Balances):
    credit_system: str


def check_system_id(value: str) -> str:
    """A system id as the table's CHECK wants it: refused early, with the field named."""
    if not isinstance(value, str) or not _SYSTEM_ID.match(value):
        raise CreditflowError("validation_error", "credit_system must be 1-63 characters of a-z, 0-9, _ and -,"
                              " starting with a letter or digit", param="credit_system")
    return value


def sub_account_id(account_id: str, system_id: str) -> str:
    """The ledger account holding ``account_id``'s balance in ``system_id`` (not the default system)."""
    return f"{account_id}.{system_id}"


def cached_system(pool: AsyncConnectionPool, feature_id: str) -> str | None:
    """The feature's system if this process has seen the feature (the hot path's lookup: no I/O)."""
    known = _feature_systems.get(pool)
    return None if known is None else known.get(feature_id)


async def feature_system(pool: AsyncConnectionPool, feature_id: str) -> str:
    """The system a feature draws on (an unknown feature: the default, where it is refused as unknown)."""
    system = cached_system(pool, feature_id)
    if system is not None:
        return system
    async with pool.connection() as conn:
        row = await (await conn.execute("SELECT credit_system_id FROM features WHERE id = %s",
                                        (feature_id,))).fetchone()
    if row is None:
        return DEFAULT_SYSTEM
    _feature_systems.setdefault(pool, {})[feature_id] = row["credit_system_id"]
    return row["credit_system_id"]


async def ledger_account(pool: AsyncConnectionPool, account_id: str, feature_id: str) -> tuple[str, str | None]:
    """Where a feature's usage of ``account_id`` goes: (ledger account, system) with system None for the default."""
    system = await feature_system(pool, feature_id)
    if system == DEFAULT_SYSTEM:
        return account_id, None
    return sub_account_id(account_id, system), system


async def parent_exists(pool: AsyncConnectionPool, account_id: str) -> bool:
    async with pool.connection() as conn:
        row = await (await conn.execute("SELECT 1 FROM accounts WHERE id = %s AND parent_account_id IS NULL",
                                        (account_id,))).fetchone()
    return row is not None


async def agent_paused(pool: AsyncConnectionPool, account_id: str, agent_id: str | None) -> bool:
    """Whether the account's agent is paused: a paused agent spends nothing, in any credit system (spend limits
    themselves apply to the wallet only)."""
    if agent_id is None:
        return False
    async with pool.connection() as conn:
        row = await (await conn.execute("SELECT 1 FROM agents WHERE account_id = %s AND id = %s AND status = 'paused'",
                                        (account_id, agent_id))).fetchone()
    return row is not None


async def ensure_sub_account(conn: AsyncConnection[Any], account_id: str, system_id: str) -> str:
    """The account's sub-account in ``system_id``, created (empty, floor zero) if it is not there yet."""
    sub = sub_account_id(account_id, system_id)
    row = await (await conn.execute(
        "INSERT INTO accounts (id, name, billing_email, parent_account_id, credit_system_id)"
        " SELECT %s, name, billing_email, id, %s FROM accounts WHERE id = %s AND parent_account_id IS NULL"
        " ON CONFLICT (id) DO UPDATE SET id = EXCLUDED.id RETURNING id", (sub, system_id, account_id))).fetchone()
    if row is None:
        raise CreditflowError("unknown_account", f"no account {account_id}")
    await conn.execute("INSERT INTO balances (account_id) VALUES (%s) ON CONFLICT (account_id) DO NOTHING", (sub,))
    return sub


async def get_system(pool: AsyncConnectionPool, system_id: str) -> CreditSystem:
    for system in await list_systems(pool, system_id):
        return system
    raise CreditflowError("unknown_credit_system", f"no credit system {system_id}", param="credit_system")


async def require_system(pool: AsyncConnectionPool, system_id: str) -> str:
    """``system_id`` if it names a credit system; else ``unknown_credit_system``."""
    await get_system(pool, check_system_id(system_id))
    return system_id


async def list_systems(pool: AsyncConnectionPool, system_id: str | None = None) -> list[CreditSystem]:
    async with pool.connection() as conn:
        rows = await (await conn.execute(
            "SELECT s.id, s.name, coalesce((SELECT array_agg(f.id ORDER BY f.id) FROM features f"
            "  WHERE f.credit_system_id = s.id), '{}') AS features FROM credit_systems s"
            " WHERE %(id)s::text IS NULL OR s.id = %(id)s ORDER BY s.id <> 'credits', s.id", {"id": system_id})
        ).fetchall()
    return [CreditSystem(id=r["id"], name=r["name"], default=r["id"] == DEFAULT_SYSTEM, features=r["features"])
            for r in rows]


async def create_system(pool: AsyncConnectionPool, system_id: str, name: str | None) -> tuple[CreditSystem, bool]:
    """Create a credit system; the same id again with the same name is the same system (``created`` False), with
    another name ``credit_system_exists``."""
    check_system_id(system_id)
    name = name or system_id.replace("-", " ").replace("_", " ").capitalize()
    async with pool.connection() as conn:
        row = await (await conn.execute(
            "INSERT INTO credit_systems (id, name) VALUES (%s, %s) ON CONFLICT (id) DO NOTHING RETURNING id",
            (system_id, name))).fetchone()
    system = await get_system(pool, system_id)
    if row is None and system.name != name:
        raise CreditflowError("credit_system_exists", f"credit system {system_id} exists with another name",
                              param="id")
    return system, row is not None


async def balances(pool: AsyncConnectionPool, account_id: str) -> list[SystemBalance]:
    """The account's balance in each system other than the default that it has been granted credits in."""
    async with pool.connection() as conn:
        rows = await (await conn.execute(
            "SELECT a.credit_system_id, b.balance_micros, cf_live_held(b.account_id, b.held_micros) AS held_micros,"
            " b.floor_micros FROM accounts a JOIN balances b ON b.account_id = a.id"
            " WHERE a.parent_account_id = %s ORDER BY a.credit_system_id", (account_id,))).fetchall()
    return [SystemBalance(credit_system=r["credit_system_id"],
                          **Balances.from_micros(r["balance_micros"], r["held_micros"], r["floor_micros"]).model_dump())
            for r in rows]


async def sub_accounts(pool: AsyncConnectionPool, account_id: str) -> list[str]:
    async with pool.connection() as conn:
        rows = await (await conn.execute("SELECT id FROM accounts WHERE parent_account_id = %s ORDER BY id",
                                         (account_id,))).fetchall()
    return [r["id"] for r in rows]


async def system_account_for_posting(pool: AsyncConnectionPool, account_id: str, system_id: str, *,
                                     grant: bool) -> str:
    """The sub-account a manual credit (``grant``) or debit in ``system_id`` posts to. A grant creates it; a debit
    of a balance never granted is refused (its balance is zero) without creating anything."""
    if grant:
        async with pool.connection() as conn, conn.transaction():
            return await ensure_sub_account(conn, account_id, system_id)
    sub = sub_account_id(account_id, system_id)
    async with pool.connection() as conn:
        row = await (await conn.execute("SELECT 1 FROM accounts WHERE id = %s", (sub,))).fetchone()
    if row is not None:
        return sub
    if not await parent_exists(pool, account_id):
        raise CreditflowError("unknown_account", f"no account {account_id}")
    raise CreditflowError("insufficient_credits", f"no credits in credit system {system_id} to debit")
