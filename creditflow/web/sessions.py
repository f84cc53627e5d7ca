"""Portal ("dashboard") sessions: a single-use link that starts a cookie session for one account.

Why a link and a cookie: the platform opens the portal for its customer without sharing an API key (like
Stripe's billing portal sessions). The link token is short-lived and single-use, so a leaked URL (browser history,
logs) is worthless once opened or after minutes; the cookie secret lives only in an HTTP-only cookie. Both are
stored as SHA-256 hashes (256-bit random secrets: a fast hash is enough, as for API keys). The session holds
``PORTAL_SESSION_SCOPES`` on its own account only and never authenticates ``/api/v1`` (deps read bearer keys only).
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from psycopg_pool import AsyncConnectionPool

from creditflow.api.keys import Principal, hash_secret
from creditflow.api.scopes import PORTAL_SESSION_SCOPES
from creditflow.errors import CreditflowError
from creditflow.ids import new_id

COOKIE_NAME = "cf_portal"
LINK_PREFIX = "cf_pl_"
COOKIE_PREFIX = "cf_ps_"


@dataclass(frozen=True)
class CreatedSession:
    id: str
    token: str
    expires_at: datetime


@dataclass(frozen=True)
class PortalSession:
    """An open session, as a page sees it."""

    id: str
    account_id: str
    return_url: str
    csrf_token: str

    @property
    def principal(self) -> Principal:
        """The caller the reused API code sees: the account's own, with the dashboard session's scopes only."""
        return Principal(key_id=f"portal:{self.id}", account_id=self.account_id,
                         scopes=frozenset(s.value for s in PORTAL_SESSION_SCOPES))

    def csrf_ok(self, given: str | None) -> bool:
        return bool(given) and hmac.compare_digest(given.encode(), self.csrf_token.encode())  # type: ignore[union-attr]


@dataclass(frozen=True)
class Opened:
    session: PortalSession
    cookie: str


LinkProblem = Literal["unknown", "expired", "used"]


class LinkRefused(Exception):
    def __init__(self, problem: LinkProblem) -> None:
        super().__init__(problem)
        self.problem = problem


async def create(pool: AsyncConnectionPool, account_id: str, return_url: str, link_ttl: timedelta,
                 created_by: str) -> CreatedSession:
    """A new session for an existing account; the link token is returned once and never stored."""
    token = LINK_PREFIX + secrets.token_urlsafe(32)
    session_id = new_id("pses")
    async with pool.connection() as conn:
        exists = await (await conn.execute("SELECT 1 FROM accounts WHERE id = %s", (account_id,))).fetchone()
        if exists is None:
            raise CreditflowError("unknown_account", f"no account {account_id}", param="account_id")
        row = await (await conn.execute(
            "INSERT INTO portal_sessions (id, account_id, return_url, link_hash, link_expires_at, created_by)"
            " VALUES (%s, %s, %s, %s, now() + %s, %s) RETURNING link_expires_at",
            (session_id, account_id, return_url, hash_secret(token), link_ttl, created_by))).fetchone()
    return CreatedSession(id=session_id, token=token, expires_at=row["link_expires_at"])


async def open_link(pool: AsyncConnectionPool, token: str, idle: timedelta) -> Opened:
    """Consume the link (once, before it expires) and start the cookie session; otherwise say why not."""
    cookie = COOKIE_PREFIX + secrets.token_urlsafe(32)
    csrf = secrets.token_urlsafe(32)
    link_hash = hash_secret(token)
    async with pool.connection() as conn:
        row = await (await conn.execute(
            "UPDATE portal_sessions SET opened_at = now(), cookie_hash = %s, csrf_token = %s,"
            " idle_expires_at = now() + %s"
            " WHERE link_hash = %s AND opened_at IS NULL AND link_expires_at > now() RETURNING *",
            (hash_secret(cookie), csrf, idle, link_hash))).fetchone()
        if row is None:
            seen = await (await conn.execute(
                "SELECT opened_at FROM portal_sessions WHERE link_hash = %s", (link_hash,))).fetchone()
            raise LinkRefused("unknown" if seen is None else "used" if seen["opened_at"] is not None else "expired")
    return Opened(session=_session(row), cookie=cookie)


async def resume(pool: AsyncConnectionPool, cookie: str | None, idle: timedelta) -> PortalSession | None:
    """The session of this cookie if it is still open (not ended, active within ``idle``), its idle time renewed."""
    if not cookie or not cookie.startswith(COOKIE_PREFIX) or len(cookie) > 100:
        return None
    async with pool.connection() as conn:
        row = await (await conn.execute(
            "UPDATE portal_sessions SET idle_expires_at = now() + %s"
            " WHERE cookie_hash = %s AND ended_at IS NULL AND idle_expires_at > now() RETURNING *",
            (idle, hash_secret(cookie)))).fetchone()
    return None if row is None else _session(row)


async def end(pool: AsyncConnectionPool, session_id: str) -> None:
    """Log out: the cookie opens nothing any more."""
    async with pool.connection() as conn:
        await conn.execute("UPDATE portal_sessions SET ended_at = coalesce(ended_at, now()) WHERE id = %s",
                           (session_id,))


def _session(row: dict[str, object]) -> PortalSession:
    return PortalSession(id=str(row["id"]), account_id=str(row["account_id"]), return_url=str(row["return_url"]),
                         csrf_token=str(row["csrf_token"]))
