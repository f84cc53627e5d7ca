"""API keys: bearer secrets stored as SHA-256 hashes, scoped to one account, one organization, or admin.

Scopes (docs/scopes.md; the route table is ``creditflow.api.scopes``): ``billing:read``; ``usage:write`` (track,
check, holds, events); ``billing:write`` (settings that charge nothing); ``payments:write`` (anything that charges
or refunds a card); ``wallet:credit`` (manual credits); ``transfers:write`` (organization keys: move credits
between the organization's workspaces); ``admin`` (the platform)."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime
from enum import StrEnum

from psycopg import sql
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel

from creditflow.errors import CreditflowError
from creditflow.ids import new_id
from creditflow.ledger.pagination import Cursor, keyset


class Scope(StrEnum):
    BILLING_READ = "billing:read"
    USAGE_WRITE = "usage:write"
    BILLING_WRITE = "billing:write"
    PAYMENTS_WRITE = "payments:write"
    WALLET_CREDIT = "wallet:credit"
    TRANSFERS_WRITE = "transfers:write"
    ADMIN = "admin"


SECRET_PREFIX = "cf_sk_"
ORG_SECRET_PREFIX = "cf_org_"
ADMIN_SECRET_PREFIX = "cf_admin_"


class ApiKey(BaseModel):
    id: str
    account_id: str | None
    organization_id: str | None = None
    name: str
    prefix: str
    scopes: list[str]
    created_at: datetime
    revoked_at: datetime | None = None


class CreatedApiKey(ApiKey):
    secret: str


class Principal(BaseModel):
    """Who is calling: an account's key (acts on that account only), an organization's key (acts on the
    organization's workspaces, ``organization_accounts`` as loaded when the key was checked) or an admin key."""

    key_id: str
    account_id: str | None
    scopes: frozenset[str]
    organization_id: str | None = None
    organization_accounts: frozenset[str] = frozenset()

    @property
    def is_admin(self) -> bool:
        return Scope.ADMIN in self.scopes


def hash_secret(secret: str) -> str:
    # Secrets carry 256 bits of entropy, so a fast hash is enough (no password stretching needed).
    return hashlib.sha256(secret.encode()).hexdigest()


class KeyCache:
    """Resolved keys of this process, by the secret's hash (never the secret), for ``ttl`` seconds: most requests
    then authenticate without a database query.

    Revoking through this process evicts at once (``evict_key``); another process's revocation, or a direct
    database change, is seen within ``ttl``. Unknown or revoked secrets are not cached, so a key created later
    works at once. ``ttl`` 0 turns the cache off. At most ``max_size`` entries, the oldest dropped first."""

    def __init__(self, ttl: float, max_size: int = 10_000) -> None:
        self.ttl = ttl
        self.max_size = max_size
        self.lookups = 0  # database queries made to resolve a secret (tests and benchmarks read it)
        self._entries: OrderedDict[str, tuple[float, Principal]] = OrderedDict()
        self._generation = 0  # bumped by every eviction: a lookup that raced one is not stored

    def get(self, secret_hash: str) -> Principal | None:
        entry = self._entries.get(secret_hash)
        if entry is None:
            return None
        if entry[0] <= time.monotonic():
            del self._entries[secret_hash]
            return None
        return entry[1]

    def put(self, secret_hash: str, principal: Principal, generation: int) -> None:
        if self.ttl <= 0 or generation != self._generation:
            return
        self._entries[secret_hash] = (time.monotonic() + self.ttl, principal)
        self._entries.move_to_end(secret_hash)
        while len(self._entries) > self.max_size:
            self._entries.popitem(last=False)

    @property
    def generation(self) -> int:
        return self._generation

    def evict_key(self, key_id: str) -> None:
        """Forget a key (it was revoked here)."""
        self._evict(lambda p: p.key_id == key_id)

    def evict_organization(self, organization_id: str) -> None:
        """Forget an organization's keys (its workspaces changed: they carry the list)."""
        self._evict(lambda p: p.organization_id == organization_id)

    def clear(self) -> None:
        self._evict(lambda p: True)

    def _evict(self, match: Callable[[Principal], bool]) -> None:
        self._generation += 1
        for secret_hash in [h for h, (_, p) in self._entries.items() if match(p)]:
            del self._entries[secret_hash]

    def __len__(self) -> int:
        return len(self._entries)


async def create_key(pool: AsyncConnectionPool, *, account_id: str | None, scopes: list[Scope],
                     name: str = "", organization_id: str | None = None) -> CreatedApiKey:
    prefix = (ORG_SECRET_PREFIX if organization_id is not None
              else ADMIN_SECRET_PREFIX if account_id is None else SECRET_PREFIX)
    secret = prefix + secrets.token_urlsafe(32)
    key_id = new_id("key")
    async with pool.connection() as conn:
        row = await (await conn.execute(
            "INSERT INTO api_keys (id, account_id, organization_id, name, prefix, secret_hash, scopes)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING *",
            (key_id, account_id, organization_id, name, secret[:12], hash_secret(secret),
             sorted({Scope(s).value for s in scopes})),
        )).fetchone()
    return CreatedApiKey(secret=secret, **_key_fields(row))


def _key_fields(row: dict[str, object]) -> dict[str, object]:
    return {k: row[k] for k in ("id", "account_id", "organization_id", "name", "prefix", "scopes", "created_at",
                                "revoked_at")}


async def list_keys(pool: AsyncConnectionPool, account_id: str, *, limit: int | None = None,
                    cursor: Cursor | None = None) -> list[ApiKey]:
    """The account's keys, revoked ones included, newest first; ``limit`` and ``cursor`` page them."""
    async with pool.connection() as conn:
        where, params, order, reverse = await keyset(conn, "api_keys", account_id, cursor)
        rows = await (await conn.execute(sql.SQL(
            "SELECT * FROM api_keys WHERE account_id = %s AND {} ORDER BY {} LIMIT %s").format(where, order),
            (account_id, *params, limit))).fetchall()
    if reverse:
        rows.reverse()
    return [ApiKey(**_key_fields(r)) for r in rows]


async def revoke_key(pool: AsyncConnectionPool, account_id: str, key_id: str, cache: KeyCache | None = None) -> ApiKey:
    async with pool.connection() as conn:
        row = await (await conn.execute(
            "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE id = %s AND account_id = %s"
            " RETURNING *", (key_id, account_id))).fetchone()
    if row is None:
        raise CreditflowError("unknown_api_key", f"no API key {key_id} on this account")
    if cache is not None:
        cache.evict_key(key_id)
    return ApiKey(**_key_fields(row))


async def list_organization_keys(pool: AsyncConnectionPool, organization_id: str, *, limit: int | None = None,
                                 cursor: Cursor | None = None) -> list[ApiKey]:
    """The organization's keys, revoked ones included, newest first (as an account's)."""
    async with pool.connection() as conn:
        where, params, order, reverse = await keyset(conn, "api_keys", organization_id, cursor, owner="organization_id")
        rows = await (await conn.execute(sql.SQL(
            "SELECT * FROM api_keys WHERE organization_id = %s AND {} ORDER BY {} LIMIT %s").format(where, order),
            (organization_id, *params, limit))).fetchall()
    if reverse:
        rows.reverse()
    return [ApiKey(**_key_fields(r)) for r in rows]


async def revoke_organization_key(pool: AsyncConnectionPool, organization_id: str, key_id: str,
                                  cache: KeyCache | None = None) -> ApiKey:
    async with pool.connection() as conn:
        row = await (await conn.execute(
            "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE id = %s AND organization_id = %s"
            " RETURNING *", (key_id, organization_id))).fetchone()
    if row is None:
        raise CreditflowError("unknown_api_key", f"no API key {key_id} on this organization")
    if cache is not None:
        cache.evict_key(key_id)
    return ApiKey(**_key_fields(row))


async def authenticate(pool: AsyncConnectionPool, secret: str, admin_secret: str | None,
                       cache: KeyCache | None = None) -> Principal:
    """Resolve a bearer secret to a principal, or raise ``unauthorized``; ``cache`` spares the query on a repeat."""
    if admin_secret and hmac.compare_digest(secret.encode(), admin_secret.encode()):
        return Principal(key_id="settings:admin", account_id=None, scopes=frozenset({Scope.ADMIN.value}))
    secret_hash = hash_secret(secret)
    if cache is not None:
        cached = cache.get(secret_hash)
        if cached is not None:
            return cached
        generation = cache.generation
        cache.lookups += 1
    async with pool.connection() as conn:
        row = await (await conn.execute(
            "SELECT k.id, k.account_id, k.organization_id, k.scopes,"
            " (SELECT coalesce(array_agg(a.id), '{}') FROM accounts a WHERE k.organization_id IS NOT NULL"
            "   AND a.organization_id = k.organization_id) AS organization_accounts"
            " FROM api_keys k WHERE k.secret_hash = %s AND k.revoked_at IS NULL",
            (secret_hash,))).fetchone()
    if row is None:
        raise CreditflowError("unauthorized", "invalid or revoked API key")
    principal = Principal(key_id=row["id"], account_id=row["account_id"], scopes=frozenset(row["scopes"]),
                          organization_id=row["organization_id"],
                          organization_accounts=frozenset(row["organization_accounts"]))
    if cache is not None:
        cache.put(secret_hash, principal, generation)
    return principal
