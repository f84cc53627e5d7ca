"""The notification service: record a notification once, then deliver it once per channel.

``NotificationService.send`` is what the ``send_notification`` activity runs. Per call:

1. the notification is written to ``notifications_log`` (once per dedup key);
2. its channels are resolved (named by the notification, else the kind's defaults among the account's
   destinations; the log always) and get a row each in ``notification_deliveries`` keyed (dedup_key, channel),
   decided at once when there is nothing to do: ``skipped`` (``no_destination`` / ``not_configured``);
3. every row not yet final is *claimed* (attempts + 1, a lease) and sent, all channels concurrently, and the
   outcome recorded: ``sent``; ``failed`` for a permanent refusal or when the attempts reach
   ``notify_max_attempts``; back to ``pending`` for a transient failure;
4. if a channel is still pending, ``NotificationPending`` is raised so the caller (Temporal) retries later;
   only unsent channels are tried again. On the caller's last attempt (``final_attempt``) pending channels
   are marked ``failed`` instead, so the outcome is always reported and a notification never fails a flow.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
from jinja2 import TemplateError
from psycopg_pool import AsyncConnectionPool

from creditflow.config import Settings
from creditflow.errors import CreditflowError
from creditflow.notify import channels as ch
from creditflow.notify.destinations import Destinations, load_destinations, redact_url
from creditflow.notify.log import ChannelDelivery, Notification, NotificationRecord, record_notification
from creditflow.notify.templates import Rendered, canonical_kind, default_channels, render

log = logging.getLogger(__name__)

FINAL = ("sent", "failed", "skipped")
ORDER = ("log", "email", "slack", "sms", "webhook")
MAX_ERROR_CHARS = 500


class NotificationPending(Exception):  # noqa: N818 - a state the caller retries, not a failure
    """Some channels are not sent yet and may still be (transient failure, or in flight elsewhere)."""

    def __init__(self, record: NotificationRecord) -> None:
        pending = [d for d in record.deliveries if d.status not in FINAL]
        super().__init__("; ".join(f"{d.channel}: {d.error or d.status}" for d in pending) or "pending")
        self.record = record


def event_id(dedup_key: str) -> str:
    """Stable per notification (not per attempt): receivers and mail clients can recognise a re-sent copy."""
    return "ntf_" + hashlib.sha256(dedup_key.encode()).hexdigest()[:32]


class NotificationService:
    def __init__(self, pool: AsyncConnectionPool, settings: Settings) -> None:
        self._pool = pool
        self._settings = settings

    async def send(self, notification: Notification, *, final_attempt: bool = False) -> NotificationRecord:
        """Record and deliver ``notification``; raises ``NotificationPending`` while a channel may still go."""
        try:  # the log first, as soon as possible: callers and tests read it as "the notification exists"
            record = await record_notification(self._pool, notification)
        except psycopg.errors.ForeignKeyViolation as exc:
            raise CreditflowError("unknown_account", f"no account {notification.account_id}") from exc
        destinations = await load_destinations(self._pool, notification.account_id)
        await self._plan(record.id, notification, destinations)
        claimed = await self._claim(notification.dedup_key)
        if claimed:
            await self._deliver(notification, destinations, claimed)
        if final_attempt:
            await self._give_up(notification.dedup_key)
        record.deliveries = await self.deliveries(notification.dedup_key)
        if any(d.status not in FINAL for d in record.deliveries):
            raise NotificationPending(record)
        return record

    def channels_for(self, notification: Notification, destinations: Destinations) -> list[str]:
        if notification.channels is not None:
            wanted = set(notification.channels)
        else:
            wanted = {c for c in default_channels(notification.kind) if destinations.has(c)}
        wanted.add("log")
        return [c for c in ORDER if c in wanted]

    def _initial_state(self, channel: str, destinations: Destinations) -> tuple[str, str | None, str | None]:
        """(status, destination, reason) of a new row: final at once when there is nothing to send."""
        if channel == "log":
            return "sent", None, None
        if not destinations.has(channel):
            return "skipped", None, "no_destination"
        if channel == "email":
            where = destinations.effective_email
            configured = bool(self._settings.smtp_host)
        elif channel == "sms":
            where, configured = destinations.sms_phone, ch.sms_configured(self._settings)
        elif channel == "slack":
            where, configured = redact_url(destinations.slack_webhook_url or ""), True
        else:  # the customer's own endpoint, shown in full by the API like the channel settings
            where, configured = destinations.webhook_url, True
        return ("pending", where, None) if configured else ("skipped", where, "not_configured")

    async def _plan(self, notification_id: int, notification: Notification, destinations: Destinations) -> None:
        """One row per channel; existing rows (a retry, or a second send of the key) are left as they are."""
        async with self._pool.connection() as conn:
            for channel in self.channels_for(notification, destinations):
                status, where, reason = self._initial_state(channel, destinations)
                await conn.execute(
                    "INSERT INTO notification_deliveries (notification_id, account_id, dedup_key, channel, status,"
                    " destination, last_error, attempts, sent_at, redelivery_of)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, CASE WHEN %s = 'sent' THEN now() END, %s)"
                    " ON CONFLICT (dedup_key, channel) DO NOTHING",
                    (notification_id, notification.account_id, notification.dedup_key, channel, status, where,
                     reason, 1 if status == "sent" else 0, status,
                     notification.redelivery_of if channel == "webhook" else None))

    async def _claim(self, dedup_key: str) -> list[str]:
        """Take the unsent channels: each claim is committed before the channel is called, so a concurrent
        attempt skips it and a crash leaves an attempt counted (and a lease that runs out)."""
        max_attempts = self._settings.notify_max_attempts
        async with self._pool.connection() as conn:
            # A send interrupted (worker died) on its last allowed attempt: report it rather than loop.
            await conn.execute(
                "UPDATE notification_deliveries SET status = 'failed', claimed_until = NULL, updated_at = now(),"
                " last_error = coalesce(last_error, 'interrupted') WHERE dedup_key = %s AND status = 'sending'"
                " AND claimed_until < now() AND attempts >= %s", (dedup_key, max_attempts))
            rows = await (await conn.execute(
                "UPDATE notification_deliveries SET status = 'sending', attempts = attempts + 1, updated_at = now(),"
                " claimed_until = now() + make_interval(secs => %s)"
                " WHERE dedup_key = %s AND attempts < %s"
                "   AND (status = 'pending' OR (status = 'sending' AND claimed_until < now()))"
                " RETURNING channel",
                (self._settings.notify_claim_seconds, dedup_key, max_attempts))).fetchall()
        return [row["channel"] for row in rows]

    async def _event(self, notification: Notification) -> tuple[str, str, dict[str, Any]]:
        """(dedup key, kind, payload) of the event to send: a redelivery sends its first delivery's event exactly
        (id and created time come from that key, the data is read back as it was recorded)."""
        if notification.redelivery_of is None:
            return notification.dedup_key, notification.kind, notification.payload
        async with self._pool.connection() as conn:
            row = await (await conn.execute(
                "SELECT l.dedup_key, l.kind, l.payload FROM notification_deliveries d"
                " JOIN notifications_log l ON l.id = d.notification_id WHERE d.id = %s AND d.account_id = %s",
                (notification.redelivery_of, notification.account_id))).fetchone()
        if row is None:
            raise CreditflowError("not_found", f"no webhook delivery {notification.redelivery_of}")
        return str(row["dedup_key"]), str(row["kind"]), dict(row["payload"] or {})

    async def _deliver(self, notification: Notification, destinations: Destinations, claimed: list[str]) -> None:
        event_key, kind, payload = await self._event(notification)
        created = await self._created(event_key)
        rendered: Rendered | None = None
        template_error = ""
        try:
            rendered = render(kind, payload, account_id=destinations.account_id,
                              account_name=destinations.account_name)
        except TemplateError as exc:
            log.error("notification %s: template of %s failed: %s", notification.dedup_key, notification.kind, exc)
            template_error = f"template_error: {exc}"
        files, attachment_error = (await self._attachments(notification) if "email" in claimed
                                   else ((), None))
        out = ch.Outgoing(kind=canonical_kind(kind), event_id=event_id(event_key),
                          created=created, payload=payload, rendered=rendered,
                          destinations=destinations, attachments=files)
        senders: dict[str, Callable[[Settings, ch.Outgoing], Awaitable[Any]]] = {
            "email": ch.send_email, "slack": ch.send_slack, "sms": ch.send_sms, "webhook": ch.send_webhook}

        async def one(channel: str) -> None:
            if rendered is None and channel != "webhook":  # the webhook carries data, not text
                await self._finish(notification.dedup_key, channel, "failed", template_error)
                return
            if channel == "email" and attachment_error:
                await self._finish(notification.dedup_key, channel, "failed", attachment_error)
                return
            try:
                sent = await senders[channel](self._settings, out)
            except ch.NotConfigured as exc:
                await self._finish(notification.dedup_key, channel, "skipped", f"not_configured: {exc}")
            except ch.DeliveryError as exc:
                log.warning("notification %s on %s failed (%s): %s", notification.dedup_key, channel,
                            "transient" if exc.transient else "permanent", exc)
                await self._finish(notification.dedup_key, channel, "retry" if exc.transient else "failed", str(exc),
                                   response_code=exc.status_code)
            except Exception as exc:  # a bug in one channel must not stop the others; retried like a transient one
                log.exception("notification %s on %s crashed", notification.dedup_key, channel)
                await self._finish(notification.dedup_key, channel, "retry", f"{type(exc).__name__}: {exc}")
            else:
                await self._finish(notification.dedup_key, channel, "sent", None,
                                   sent if isinstance(sent, str) else None,
                                   response_code=sent.status_code if isinstance(sent, ch.HttpAnswer) else None)

        await asyncio.gather(*(one(channel) for channel in claimed))

    async def _attachments(self, notification: Notification) -> tuple[tuple[tuple[str, str, bytes], ...], str | None]:
        """The email's attachments, read now (the notification names them: workflow payloads stay small).
        Only the account's own invoices can be attached."""
        from creditflow.invoicing.store import pdf_attachment  # the invoicing package is only needed here

        files = []
        for attachment in notification.attachments:
            found = await pdf_attachment(self._pool, notification.account_id, attachment.invoice_id)
            if found is None:
                return (), f"attachment_missing: invoice {attachment.invoice_id}"
            files.append((attachment.filename, attachment.content_type, found[1]))
        return tuple(files), None

    async def _created(self, dedup_key: str) -> int:
        async with self._pool.connection() as conn:
            row = await (await conn.execute(
                "SELECT floor(extract(epoch FROM created_at))::bigint AS created FROM notifications_log"
                " WHERE dedup_key = %s",
                (dedup_key,))).fetchone()
        assert row is not None
        return int(row["created"])

    async def _finish(self, dedup_key: str, channel: str, outcome: str, error: str | None,
                      provider_id: str | None = None, *, response_code: int | None = None) -> None:
        """Record one attempt's outcome; ``retry`` becomes ``failed`` once the attempts are used up.
        ``response_code``: this attempt's HTTP status (None: no answer), replacing the previous attempt's."""
        error = error[:MAX_ERROR_CHARS] if error else None
        async with self._pool.connection() as conn:
            await conn.execute(
                "UPDATE notification_deliveries SET claimed_until = NULL, updated_at = now(),"
                " status = CASE WHEN %(o)s <> 'retry' THEN %(o)s WHEN attempts >= %(max)s THEN 'failed'"
                "               ELSE 'pending' END,"
                " last_error = coalesce(%(e)s, last_error), provider_id = coalesce(%(p)s, provider_id),"
                " response_code = %(r)s,"
                " sent_at = CASE WHEN %(o)s = 'sent' THEN now() ELSE sent_at END"
                " WHERE dedup_key = %(k)s AND channel = %(c)s",
                {"o": outcome, "max": self._settings.notify_max_attempts, "e": error, "p": provider_id,
                 "r": response_code if response_code is not None and 100 <= response_code <= 599 else None,
                 "k": dedup_key, "c": channel})

    async def _give_up(self, dedup_key: str) -> None:
        """The caller will not retry: what is still pending is reported failed (not what another attempt holds)."""
        async with self._pool.connection() as conn:
            await conn.execute(
                "UPDATE notification_deliveries SET status = 'failed', updated_at = now(),"
                " last_error = coalesce(last_error, 'gave_up') WHERE dedup_key = %s AND status = 'pending'",
                (dedup_key,))

    async def deliveries(self, dedup_key: str) -> list[ChannelDelivery]:
        async with self._pool.connection() as conn:
            rows = await (await conn.execute(
                "SELECT channel, status, attempts, destination, last_error AS error, sent_at"
                " FROM notification_deliveries WHERE dedup_key = %s", (dedup_key,))).fetchall()
        return sorted((ChannelDelivery(**row) for row in rows), key=lambda d: ORDER.index(d.channel))
