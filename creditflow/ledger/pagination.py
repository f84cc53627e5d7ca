"""Cursor pagination for newest-first lists (Stripe's ``limit``, ``starting_after``, ``ending_before``).

Rows are ordered by ``(created_at, id)`` descending: a total, stable order, so a cursor (the id of an item the
client has) names one position whatever is inserted meanwhile. ``starting_after`` pages towards older items,
``ending_before`` towards newer ones. A cursor that is not an item of the account's list is refused.
"""

from __future__ import annotations

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


async def keyset(conn: AsyncConnection, table: str, account_id: str | None,
                 cursor: Cursor | None) -> tuple[sql.Composable, tuple[object, ...], sql.Composable, bool]:
    """(condition to AND into the WHERE clause, its parameters, ORDER BY, whether to reverse the fetched rows).
    ``account_id`` None: a list that is not one account's (the admin's list of accounts), any row is a cursor."""
    newest_first = sql.SQL("created_at DESC, id DESC")
    if cursor is None or (cursor.starting_after is None and cursor.ending_before is None):
        return sql.SQL("TRUE"), (), newest_first, False
    name, given = (("starting_after", cursor.starting_after) if cursor.starting_after is not None
                   else ("ending_before", cursor.ending_before))
    owner = sql.SQL("account_id = %s" if account_id is not None else "%s::text IS NULL")
    row = await (await conn.execute(sql.SQL("SELECT created_at, id FROM {} WHERE {} AND id = %s")
                                    .format(sql.Identifier(table), owner), (account_id, given))).fetchone()
    if row is None:
        raise CreditflowError("validation_error", f"{name} is not an item of this list", param=name)
    created_at, item_id = (row["created_at"], row["id"]) if isinstance(row, dict) else row
    if name == "starting_after":
        return sql.SQL("(created_at, id) < (%s, %s)"), (created_at, item_id), newest_first, False
    return sql.SQL("(created_at, id) > (%s, %s)"), (created_at, item_id), sql.SQL("created_at ASC, id ASC"), True
