"""Organizations (owners of workspaces) and transfers of credits between one organization's workspaces.

Why in the ledger: a transfer is two ledger legs and a split of credit lots that must commit together and keep the
credits' provenance (source, price, expiry, refundability), so it is one SQL function, ``cf_transfer`` (migration
0031_2); this module validates, names errors and reads. docs/organizations-and-transfers.md.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel

from creditflow.domain.money import credits_to_micros, micros_to_credits
from creditflow.errors import CreditflowError
from creditflow.ids import new_id
from creditflow.ledger.idempotency import request_hash
from creditflow.ledger.models import txn_id
from creditflow.ledger.pagination import Cursor, keyset

# Codes cf_transfer raises (the exception's message is the code).
_SQL_CODES = frozenset({"invalid_amount", "same_account", "idempotency_conflict", "not_in_organization",
                        "insufficient_credits", "destination_in_overage"})


class Organization(BaseModel):
    id: str
    name: str
    external_id: str | None = None
    created_at: datetime
    account_ids: list[str]


class MovedLot(BaseModel):
    """One part of a transfer: credits of ``from_lot_id`` that became ``lot_id`` on the destination."""

    lot_id: str
    from_lot_id: str
    origin_lot_id: str
    source: str
    credits: Decimal
    expires_at: datetime | None = None


class Transfer(BaseModel):
    id: str
    organization_id: str
    from_account_id: str
    to_account_id: str
    amount: Decimal
    description: str
    idempotency_key: str
    from_transaction_id: str
    to_transaction_id: str
    created_at: datetime
    lots: list[MovedLot]
    replayed: bool = False


async def create_organization(pool: AsyncConnectionPool, *, name: str, external_id: str | None) -> Organization:
    async with pool.connection() as conn:
        row = await (await conn.execute(
            "INSERT INTO organizations (id, name, external_id) VALUES (%s, %s, %s)"
            " ON CONFLICT (external_id) DO NOTHING RETURNING id", (new_id("org"), name, external_id))).fetchone()
        if row is None:
            existing = await (await conn.execute("SELECT id FROM organizations WHERE external_id = %s",
                                                 (external_id,))).fetchone()
            raise CreditflowError("organization_exists", f"an organization with external_id {external_id!r} exists",
                                  details={"organization_id": existing["id"] if existing else None})
    return await get_organization(pool, row["id"])


async def get_organization(pool: AsyncConnectionPool, organization_id: str) -> Organization:
    async with pool.connection() as conn:
        row = await (await conn.execute(
            "SELECT o.*, coalesce((SELECT array_agg(a.id ORDER BY a.created_at, a.id) FROM accounts a"
            " WHERE a.organization_id = o.id), '{}') AS account_ids FROM organizations o WHERE o.id = %s",
            (organization_id,))).fetchone()
    if row is None:
        raise CreditflowError("unknown_organization", f"no organization {organization_id}")
    return Organization(**row)


async def attach_account(pool: AsyncConnectionPool, organization_id: str, account_id: str) -> Organization:
    """Make the account a workspace of the organization (idempotent); an account of another organization is
    refused (``account_in_other_organization``): moving a workspace between organizations is not supported."""
    async with pool.connection() as conn, conn.transaction():
        org = await (await conn.execute("SELECT id FROM organizations WHERE id = %s FOR UPDATE",
                                        (organization_id,))).fetchone()
        if org is None:
            raise CreditflowError("unknown_organization", f"no organization {organization_id}")
        acc = await (await conn.execute("SELECT organization_id FROM accounts WHERE id = %s FOR UPDATE",
                                        (account_id,))).fetchone()
        if acc is None:
            raise CreditflowError("unknown_account", f"no account {account_id}")
        if acc["organization_id"] not in (None, organization_id):
            raise CreditflowError("account_in_other_organization",
                                  f"account {account_id} is a workspace of another organization")
        await conn.execute("UPDATE accounts SET organization_id = %s WHERE id = %s", (organization_id, account_id))
    return await get_organization(pool, organization_id)


async def transfer(pool: AsyncConnectionPool, *, organization_id: str, from_account_id: str, to_account_id: str,
                   amount_credits: int, idempotency_key: str, description: str, requested_by: str) -> Transfer:
    """Move whole credits between two workspaces of the organization, once per idempotency key."""
    amount = credits_to_micros(amount_credits)
    fingerprint = request_hash("transfer", organization_id, from_account_id, to_account_id, amount, description)
    try:
        async with pool.connection() as conn, conn.transaction():
            row = await (await conn.execute(
                "SELECT * FROM cf_transfer(%s, %s, %s, %s, %s, %s, %s, %s)",
                (organization_id, from_account_id, to_account_id, amount, idempotency_key, fingerprint,
                 description, requested_by))).fetchone()
    except psycopg.Error as exc:
        code = str(exc.diag.message_primary or "")
        if code not in _SQL_CODES:
            raise
        if code == "not_in_organization":
            raise CreditflowError("forbidden", "both accounts must be workspaces of this organization") from exc
        if code == "same_account":
            raise CreditflowError("validation_error", "from_account_id and to_account_id must differ") from exc
        raise CreditflowError(code, _MESSAGES.get(code)) from exc
    assert row is not None
    [result] = await _load(pool, "t.id = %s", (row["transfer_id"],))
    return result.model_copy(update={"replayed": bool(row["replayed"])})


_MESSAGES = {
    "insufficient_credits": "the source workspace has fewer transferable credits available (plan credits, expired "
                            "credits and credits reserved by holds do not move)",
    "destination_in_overage": "the destination workspace is drawing on its overage line; settle it first",
    "idempotency_conflict": "this idempotency_key was used for another transfer",
}


async def list_transfers(pool: AsyncConnectionPool, organization_id: str, *, account_id: str | None = None,
                         limit: int = 50, cursor: Cursor | None = None) -> list[Transfer]:
    """The organization's transfers, newest first (or those one workspace sent or received); ``cursor`` pages them
    (a transfer of this organization)."""
    await get_organization(pool, organization_id)
    where = "t.organization_id = %s" + (" AND %s IN (t.from_account_id, t.to_account_id)" if account_id else "")
    params: tuple[Any, ...] = (organization_id, account_id) if account_id else (organization_id,)
    return await _load(pool, where, params, limit=limit, cursor=cursor, organization_id=organization_id)


async def _load(pool: AsyncConnectionPool, where: str, params: tuple[Any, ...], limit: int = 50,
                cursor: Cursor | None = None, organization_id: str | None = None) -> list[Transfer]:
    async with pool.connection() as conn:
        page, page_params, order, reverse = await keyset(conn, "transfers", organization_id, cursor,
                                                         owner="organization_id")
        rows = await (await conn.execute(sql.SQL(
            "SELECT t.*, coalesce((SELECT jsonb_agg(jsonb_build_object('lot_id', l.id, 'from_lot_id', l.parent_lot_id,"
            "  'origin_lot_id', l.origin_lot_id, 'source', l.source, 'micros', l.original_micros,"
            "  'expires_at', l.expires_at) ORDER BY l.id) FROM credit_lots l WHERE l.transfer_id = t.id), '[]')"
            " AS lots FROM transfers t WHERE " + where + " AND {} ORDER BY {} LIMIT %s").format(page, order),
            (*params, *page_params, limit))).fetchall()
    if reverse:
        rows.reverse()
    return [Transfer(
        id=r["id"], organization_id=r["organization_id"], from_account_id=r["from_account_id"],
        to_account_id=r["to_account_id"], amount=micros_to_credits(r["amount_micros"]), description=r["description"],
        idempotency_key=r["idempotency_key"], from_transaction_id=txn_id(r["out_txn_id"]) or "",
        to_transaction_id=txn_id(r["in_txn_id"]) or "", created_at=r["created_at"],
        lots=[MovedLot(lot_id=m["lot_id"], from_lot_id=m["from_lot_id"], origin_lot_id=m["origin_lot_id"],
                       source=m["source"], credits=micros_to_credits(int(m["micros"])),
                       expires_at=m["expires_at"]) for m in r["lots"]]) for r in rows]


async def moved_remaining_micros(pool: AsyncConnectionPool, lot_id: str) -> int:
    """What remains, exact as of now, of the credits transfers moved out of ``lot_id`` (wherever they went): a
    refund of the purchase may take them back (cf_refund_reserve, 0031_3)."""
    async with pool.connection() as conn, conn.transaction():
        holders = await (await conn.execute(
            "SELECT DISTINCT account_id FROM credit_lots WHERE origin_lot_id = %s ORDER BY account_id",
            (lot_id,))).fetchall()
        for holder in holders:  # deferred burns applied, so the lots are exact
            await conn.execute("SELECT cf_settle_account_burns(%s)", (holder["account_id"],))
        row = await (await conn.execute(
            "SELECT coalesce(sum(remaining_micros), 0)::bigint AS micros FROM credit_lots WHERE origin_lot_id = %s",
            (lot_id,))).fetchone()
    return int(row["micros"]) if row else 0
