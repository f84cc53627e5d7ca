"""Where an account's notifications go: email (billing email or an override), Slack, SMS, a signed webhook.

One row per account in ``notification_channels`` (none: email to the billing email only). The webhook
signing secret is generated here, never chosen by the customer, exists exactly while a webhook URL is set,
and is returned only by the update that created or rotated it (like an API key's secret).
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import secrets
import socket
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel

from creditflow.errors import CreditflowError

EMAIL_RE = re.compile(r"^[^@\s]{1,64}@[^@\s]+\.[^@\s]{2,}$")
PHONE_RE = re.compile(r"^\+[1-9][0-9]{6,14}$")  # E.164
SECRET_PREFIX = "whsec_"
CHANNELS = ("log", "email", "slack", "sms", "webhook")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


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
    are refused unless the deployment allows them (tests and private networks). A host given as an address is
    checked in every notation the resolver accepts (``2130706433``, ``0x7f000001``, ``127.1``, ``[::ffff:7f00:1]``);
    a host name is resolved and checked again when the worker sends (:func:`resolve_destination`)."""
    if len(value) > 2048 or any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("not a URL")
    parts = urlsplit(value)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError("must be an absolute http(s) URL")
    if parts.username or parts.password:
        raise ValueError("must not carry credentials")
    try:
        _ = parts.port
        host = url_host(value)
    except ValueError as exc:
        raise ValueError(f"has an invalid host or port: {exc}") from exc
    if parts.scheme == "http" and not allow_http:
        raise ValueError("must use https")
    if not allow_private:
        reason = refused_host(host)
        if reason:
            raise ValueError(f"must not point at {reason}")
    return value


def url_host(url: str) -> str:
    """The host the HTTP client will connect to (IDNA-encoded, lower case, no trailing dot)."""
    try:
        host = httpx.URL(url).host
    except (httpx.InvalidURL, ValueError) as exc:
        raise ValueError(str(exc)) from exc
    host = host.rstrip(".")
    if not host or "%" in host:  # an empty host, or an IPv6 zone id (``fe80::1%eth0``): link-local by nature
        raise ValueError("not a usable host")
    return host


_NUMERIC_HOST = re.compile(r"^[0-9a-fx.]+$")


def host_address(host: str) -> IPAddress | None:
    """The address a host denotes by itself (None for a name to resolve), in every notation the C resolver
    takes: dotted quads, but also ``127.1``, ``0x7f000001``, ``017700000001``, ``2130706433``, and IPv6."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if _NUMERIC_HOST.match(host) and not host.startswith(("x", ".")) and any(c.isdigit() for c in host[:1]):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None  # not an address after all (``08.1``): a name, resolved and checked at send time
    return None


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def refused_address(address: IPAddress) -> str | None:
    """Why a customer URL may not reach ``address`` (None: a public unicast address). IPv6 forms that carry an
    IPv4 address (mapped, NAT64, 6to4) are judged by that address."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour or (
            ipaddress.IPv4Address(int(address) & 0xFFFFFFFF) if address in _NAT64 else None)
        if embedded is not None:
            return refused_address(embedded)
    for label, flag in (("a loopback address", address.is_loopback), ("an unspecified address", address.is_unspecified),
                        ("a link-local address", address.is_link_local), ("a multicast address", address.is_multicast),
                        ("a private address", address.is_private), ("a reserved address", address.is_reserved)):
        if flag:
            return f"{label} ({address})"
    if not address.is_global:  # shared address space (100.64.0.0/10) and the like
        return f"a non-public address ({address})"
    return None


def refused_host(host: str) -> str | None:
    """Why a URL's host is refused without resolving it (None: an allowed address, or a name)."""
    if host == "localhost" or host.endswith(".localhost"):
        return "a loopback host"
    address = host_address(host)
    return refused_address(address) if address is not None else None


class DestinationRefused(Exception):  # noqa: N818 - a verdict on the destination
    """The URL's host is or resolves to an address customers may not reach: retrying cannot help."""


async def resolve_destination(url: str, *, allow_private: bool) -> str:
    """The one address to connect to for ``url``, checked: an address host as is, a name resolved once here.
    Every address the name resolves to must be allowed (a name that also points inside is refused, whatever
    order the resolver returns). The caller connects to the returned address, so no second DNS lookup can
    rebind it. DNS failures raise ``OSError`` (transient); refusals ``DestinationRefused``."""
    try:
        host = url_host(url)
        address = host_address(host)
    except ValueError as exc:
        raise DestinationRefused(str(exc)) from exc
    if address is None:
        if not allow_private and (reason := refused_host(host)):
            raise DestinationRefused(f"{host} is {reason}")
        port = httpx.URL(url).port or (443 if url.lower().startswith("https") else 80)
        infos = await getaddrinfo(host, port)
        addresses = [ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos]
        if not addresses:
            raise OSError(f"{host} has no address")
    else:
        addresses = [address]
    if not allow_private:
        for found in addresses:
            if reason := refused_address(found):
                raise DestinationRefused(f"{host} resolves to {reason}")
    return str(addresses[0])


async def getaddrinfo(host: str, port: int) -> list[Any]:
    """The system resolver, off the event loop (a seam for tests that need a name to resolve somewhere)."""
    return await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)


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
