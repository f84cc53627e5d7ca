"""Where an account's notifications go: email (billing email or an override), Slack, SMS, a signed webhook.

One row per account in ``notification_channels`` (none: email to the billing email only). The webhook
signing secret is generated here, never chosen by the customer, exists exactly while a webhook URL is set,
and is returned only by the update that created or rotated it (like an API key's secret).
"""

from __future__ import annotations

import ipaddress
import re
import secrets
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel

from creditflow.errors import CreditflowError

EMAIL_RE = re.compile(r"^[^@\s]{1,64}@[^@\s]+\.[^@\s]{2,}$")
PHONE_RE = re.compile(r"^\+[1-9][0-9]{6,14}$")  # E.164
SECRET_PREFIX = "whsec_"
CHANNELS = ("log", "email", "slack", "sms", "webhook")


def check_email(value: str) -> str:
    if len(value) > 254 or not EMAIL_RE.match(value):
        raise ValueError("not an email address")
    return value


def check_phone(value: str) -> str:
    if not PHONE_RE.match(value):
        raise ValueError("not a phone number in E.164 form (+ then 7 to 15 digits, e.g. +14155550100)")
    return value


def check_url(value: str, *, allow_http: bool, allow_private: bool) -> str:
    """An absolute https URL with no credentials in it. Customers choose these URLs and the worker POSTs to
    them, so plain http (``allow_http``) and hosts that are loopback or private IP addresses (``allow_private``)
    are refused unless the deployment allows them (tests and private networks)."""
    if len(value) > 2048 or any(c.isspace() for c in value):
        raise ValueError("not a URL")
    parts = urlsplit(value)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError("must be an absolute http(s) URL")
    if parts.username or parts.password:
        raise ValueError("must not carry credentials")
    try:
        _ = parts.port
    except ValueError as exc:
        raise ValueError("has an invalid port") from exc
    if parts.scheme == "http" and not allow_http:
        raise ValueError("must use https")
    if not allow_private and _is_internal(parts.hostname):
        raise ValueError("must not point at a loopback or private address")
    return value


def _is_internal(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_private or address.is_link_local or address.is_unspecified


def redact_url(url: str) -> str:
    """Scheme and host only: a Slack webhook URL's path is its credential."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}/…"


def new_webhook_secret() -> str:
    return SECRET_PREFIX + secrets.token_hex(32)


class Destinations(BaseModel):
    """An account's resolved destinations, as the notification service uses them."""

    account_id: str
    account_name: str
    billing_email: str
    email: str | None = None  # override of the billing email
    slack_webhook_url: str | None = None
    sms_phone: str | None = None
    webhook_url: str | None = None
    webhook_secret: str | None = None
    updated_at: datetime | None = None

    @property
    def effective_email(self) -> str:
        return self.email or self.billing_email

    def has(self, channel: str) -> bool:
        return {"log": True, "email": bool(self.effective_email), "slack": bool(self.slack_webhook_url),
                "sms": bool(self.sms_phone), "webhook": bool(self.webhook_url and self.webhook_secret)}[channel]


async def load_destinations(pool: AsyncConnectionPool, account_id: str) -> Destinations:
    async with pool.connection() as conn:
        row = await (await conn.execute(
            "SELECT a.id AS account_id, a.name AS account_name, a.billing_email, c.email, c.slack_webhook_url,"
            " c.sms_phone, c.webhook_url, c.webhook_secret, c.updated_at"
            " FROM accounts a LEFT JOIN notification_channels c ON c.account_id = a.id WHERE a.id = %s",
            (account_id,))).fetchone()
    if row is None:
        raise CreditflowError("unknown_account", f"no account {account_id}")
    return Destinations(**row)


class DestinationsUpdate(BaseModel):
    """The fields an update sets (``None`` clears one); fields left out keep their value."""

    values: dict[str, str | None]
    rotate_webhook_secret: bool = False


async def update_destinations(pool: AsyncConnectionPool, account_id: str,
                              update: DestinationsUpdate) -> tuple[Destinations, str | None]:
    """Apply ``update`` in one transaction (row locked); returns the result and the secret if one was made."""
    allowed = {"email", "slack_webhook_url", "sms_phone", "webhook_url"}
    assert set(update.values) <= allowed, update.values
    async with pool.connection() as conn, conn.transaction():
        account = await (await conn.execute("SELECT id FROM accounts WHERE id = %s FOR SHARE",
                                            (account_id,))).fetchone()
        if account is None:
            raise CreditflowError("unknown_account", f"no account {account_id}")
        await conn.execute("INSERT INTO notification_channels (account_id) VALUES (%s) ON CONFLICT DO NOTHING",
                           (account_id,))
        current = await (await conn.execute(
            "SELECT email, slack_webhook_url, sms_phone, webhook_url, webhook_secret"
            " FROM notification_channels WHERE account_id = %s FOR UPDATE", (account_id,))).fetchone()
        assert current is not None
        merged: dict[str, Any] = {**current, **update.values}
        secret: str | None = None
        if merged["webhook_url"] is None:
            if update.rotate_webhook_secret:
                raise CreditflowError("validation_error", "rotate_webhook_secret needs a webhook_url",
                                      details={"problems": [{"field": "rotate_webhook_secret",
                                                             "message": "no webhook_url is set"}]})
            merged["webhook_secret"] = None
        elif merged["webhook_secret"] is None or update.rotate_webhook_secret:
            secret = merged["webhook_secret"] = new_webhook_secret()
        await conn.execute(
            "UPDATE notification_channels SET email = %s, slack_webhook_url = %s, sms_phone = %s, webhook_url = %s,"
            " webhook_secret = %s,"
            " webhook_secret_created_at = CASE WHEN %s::boolean THEN now() WHEN %s::text IS NULL THEN NULL"
            "                                  ELSE webhook_secret_created_at END,"
            " updated_at = now() WHERE account_id = %s",
            (merged["email"], merged["slack_webhook_url"], merged["sms_phone"], merged["webhook_url"],
             merged["webhook_secret"], secret is not None, merged["webhook_secret"], account_id))
    return await load_destinations(pool, account_id), secret
