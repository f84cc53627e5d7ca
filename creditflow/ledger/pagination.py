"""Cursor pagination for newest-first lists (Stripe's ``limit``, ``starting_after``, ``ending_before``).

Rows are ordered by ``(created_at, id)`` descending: a total, stable order, so a cursor (the id of an item the
client has) names one position whatever is inserted meanwhile. ``starting_after`` pages towards older items,
``ending_before`` towards newer ones. A cursor that is not an item of the account's list is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from psycopg import AsyncConnection, sql

from creditflow.errors import CreditflowError


@dataclass(frozen=True)
class Cursor:
    starting_after: str | None = None
    ending_before: str | None = None

    def __post_init__(self) -> None:
        if self.starting_after is not None and self.ending_before is not None:
            raise CreditflowError("validation_error", "starting_after and ending_before exclude each other",
                                  param="ending_before")


async def keyset(conn: AsyncConnection, table: str, account_id: str | None, cursor: Cursor | None, *,
                 time: str = "created_at", tiebreak: str = "id", key: Callable[[str], object] | None = None,
                 owner: str = "account_id") -> tuple[sql.Composable, tuple[object, ...], sql.Composable, bool]:
    """(condition to AND into the WHERE clause, its parameters, ORDER BY, whether to reverse the fetched rows).

    ``account_id`` None: a list that is not one account's (accounts, reconciliation runs), any row is a cursor;
    ``owner`` names the column ``account_id`` is compared with (``organization_id`` for an organization's lists).
    Lists ordered otherwise name their columns: ``time`` (``issued_at``, ``started_at``), ``tiebreak`` (the
    journal's ``seq``); the cursor is always looked up by the ``id`` column, ``key`` turning the public id into
    the stored one (``txn_<hex>`` to the journal's uuid); a cursor ``key`` cannot read is not an item either."""
    t, b = sql.Identifier(time), sql.Identifier(tiebreak)
    newest_first = sql.SQL("{} DESC, {} DESC").format(t, b)
    if cursor is None or (cursor.starting_after is None and cursor.ending_before is None):
        return sql.SQL("TRUE"), (), newest_first, False
    name, given = (("starting_after", cursor.starting_after) if cursor.starting_after is not None
                   else ("ending_before", cursor.ending_before))
    stored: object = given
    if key is not None:
        try:
            stored = key(given)
        except ValueError:
            stored = None
    owned = (sql.SQL("{} = %s").format(sql.Identifier(owner)) if account_id is not None
             else sql.SQL("%s::text IS NULL"))
    row = None if stored is None else await (await conn.execute(
        sql.SQL("SELECT {} AS t, {} AS b FROM {} WHERE {} AND id = %s").format(t, b, sql.Identifier(table), owned),
        (account_id, stored))).fetchone()
    if row is None:
        raise CreditflowError("validation_error", f"{name} is not an item of this list", param=name)
    at, tie = (row["t"], row["b"]) if isinstance(row, dict) else row
    if name == "starting_after":
        return sql.SQL("({}, {}) < (%s, %s)").format(t, b), (at, tie), newest_first, False
    return sql.SQL("({}, {}) > (%s, %s)").format(t, b), (at, tie), sql.SQL("{} ASC, {} ASC").format(t, b), True
