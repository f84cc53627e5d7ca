"""The delivery channels: email over SMTP, Slack incoming webhooks, SMS (Twilio-compatible), signed webhooks.

Each sender makes one attempt and says how it failed: ``DeliveryError(transient=True)`` (network, timeout,
429 or 5xx, SMTP 4xx: worth another attempt later) or ``transient=False`` (the destination refused the
message for good: retrying cannot help). ``NotConfigured`` means this deployment has no settings for the
channel. Retrying, attempt counting and the sent-log are the service's job (``service.py``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate
from typing import Any

import aiosmtplib
import httpcore
import httpx
import simplejson

from creditflow import __version__
from creditflow.config import Settings
from creditflow.notify.destinations import DestinationRefused, Destinations, check_url, resolve_destination
from creditflow.notify.events import api_units
from creditflow.notify.signing import SIGNATURE_HEADER, signature_header
from creditflow.notify.templates import Rendered

USER_AGENT = f"creditflow-notifications/{__version__}"


class DeliveryError(Exception):
    """One attempt failed; ``transient`` says whether another attempt may succeed."""

    def __init__(self, message: str, *, transient: bool, status_code: int | None = None) -> None:
        super().__init__(message)
        self.transient = transient
        self.status_code = status_code  # the HTTP answer's status, when there was one


@dataclass(frozen=True)
class HttpAnswer:
    """What an HTTP channel's receiver answered (kept as the delivery's ``response_code``)."""

    status_code: int


class NotConfigured(Exception):  # noqa: N818 - a state, not an error: the channel is reported skipped
    """The deployment has no settings for this channel (e.g. no SMTP host)."""


@dataclass(frozen=True)
class Outgoing:
    """Everything a channel needs to send one notification. ``event_id`` is stable across attempts."""

    kind: str
    event_id: str
    created: int
    payload: dict[str, Any]
    rendered: Rendered | None  # None: the template failed (only the webhook, which carries data, can go)
    destinations: Destinations
    # (file name, content type, bytes) of each email attachment, resolved by the service; other channels ignore them.
    attachments: tuple[tuple[str, str, bytes], ...] = ()

    @property
    def text(self) -> Rendered:
        assert self.rendered is not None, "templated channels are not sent when the template failed"
        return self.rendered


def _http_error(response: httpx.Response, *, retry_any: bool) -> DeliveryError:
    transient = retry_any or response.status_code in (408, 425, 429) or response.status_code >= 500
    excerpt = " ".join(response.text[:200].split())
    return DeliveryError(f"HTTP {response.status_code}" + (f": {excerpt}" if excerpt else ""), transient=transient,
                         status_code=response.status_code)


class _PinnedBackend(httpcore.AsyncNetworkBackend):
    """Opens every connection to one checked address, whatever host name the URL carries: TLS still verifies
    the certificate against the URL's name (SNI), but the name is never resolved again (no DNS rebinding)."""

    def __init__(self, address: str) -> None:
        self._address = address
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                          socket_options: Iterable[Any] | None = None) -> httpcore.AsyncNetworkStream:
        return await self._inner.connect_tcp(self._address, port, timeout=timeout, local_address=local_address,
                                             socket_options=socket_options)

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def _pinned_transport(address: str) -> httpx.AsyncHTTPTransport:
    """A transport (no proxies from the environment: a proxy would resolve the name itself) whose connections
    all go to ``address``."""
    transport = httpx.AsyncHTTPTransport(trust_env=False)
    ssl_context = transport._pool._ssl_context  # noqa: SLF001 - the context httpx built (certifi, verification on)
    transport._pool = httpcore.AsyncConnectionPool(ssl_context=ssl_context, max_connections=1,  # noqa: SLF001
                                                   network_backend=_PinnedBackend(address))
    return transport


@dataclass(frozen=True)
class CustomerUrl:
    """A URL a customer chose: checked again at send time (:func:`resolve_destination`)."""

    allow_http: bool
    allow_private: bool

    @classmethod
    def of(cls, settings: Settings) -> CustomerUrl:
        return cls(allow_http=settings.notify_allow_http_urls, allow_private=settings.notify_allow_private_urls)


async def _post(url: str, *, timeout: float, retry_any: bool, customer: CustomerUrl | None = None,
                **kwargs: Any) -> httpx.Response:
    """POST without following redirects; transport failures are transient. A ``customer`` URL is resolved here,
    refused (permanently) if it is or resolves to a loopback, private, link-local, multicast or reserved address,
    and the connection goes to the address that was checked."""
    transport: httpx.AsyncHTTPTransport | None = None
    if customer is not None:
        try:
            check_url(url, allow_http=customer.allow_http, allow_private=customer.allow_private)
            address = await asyncio.wait_for(resolve_destination(url, allow_private=customer.allow_private), timeout)
        except (ValueError, DestinationRefused) as exc:
            raise DeliveryError(f"destination refused: {exc}", transient=False) from exc
        except OSError as exc:  # includes TimeoutError: the resolver did not answer in time
            raise DeliveryError(f"cannot resolve the destination: {exc or type(exc).__name__}", transient=True) from exc
        transport = _pinned_transport(address)
    try:
        async with httpx.AsyncClient(timeout=timeout, follow_redirects=False, transport=transport,
                                     headers={"User-Agent": USER_AGENT}) as client:
            response = await client.post(url, **kwargs)
    except httpx.HTTPError as exc:
        raise DeliveryError(f"{type(exc).__name__}: {exc}".rstrip(": "), transient=True) from exc
    if not 200 <= response.status_code < 300:
        raise _http_error(response, retry_any=retry_any)
    return response


def email_message(settings: Settings, out: Outgoing) -> EmailMessage:
    """A plain-text email (multipart/mixed when it has attachments). The Message-ID comes from the event id, so a
    re-sent copy is recognisable."""
    msg = EmailMessage()
    msg["From"] = settings.smtp_from
    msg["To"] = out.destinations.effective_email
    msg["Subject"] = out.text.email_subject
    msg["Date"] = formatdate(out.created, usegmt=True)
    msg["Message-ID"] = f"<{out.event_id}@creditflow>"
    msg["X-Creditflow-Event"] = out.kind
    msg.set_content(out.text.email_body)
    for filename, content_type, data in out.attachments:  # none: the plain-text message as before
        maintype, _, subtype = content_type.partition("/")
        msg.add_attachment(data, maintype=maintype, subtype=subtype or "octet-stream", filename=filename)
    return msg


async def send_email(settings: Settings, out: Outgoing) -> str:
    if not settings.smtp_host:
        raise NotConfigured("no SMTP host (CREDITFLOW_SMTP_HOST)")
    msg = email_message(settings, out)
    try:
        await aiosmtplib.send(
            msg, hostname=settings.smtp_host, port=settings.smtp_port,
            username=settings.smtp_username or None,
            password=settings.smtp_password.get_secret_value() or None,
            start_tls=settings.smtp_starttls and not settings.smtp_use_tls, use_tls=settings.smtp_use_tls,
            timeout=settings.smtp_timeout_seconds)
    except aiosmtplib.SMTPRecipientsRefused as exc:
        codes = [err.code for err in exc.recipients]
        raise DeliveryError(f"recipient refused: {exc.recipients[0]}" if exc.recipients else "recipients refused",
                            transient=all(400 <= code < 500 for code in codes)) from exc
    except aiosmtplib.SMTPResponseException as exc:
        raise DeliveryError(f"SMTP {exc.code}: {exc.message}", transient=exc.code < 500) from exc
    except (aiosmtplib.SMTPException, OSError) as exc:
        raise DeliveryError(f"{type(exc).__name__}: {exc}", transient=True) from exc
    return str(msg["Message-ID"])


async def send_slack(settings: Settings, out: Outgoing) -> HttpAnswer:
    """Slack incoming webhook: ``{"text": ...}``. Slack answers 4xx for a revoked or invalid hook: final."""
    url = out.destinations.slack_webhook_url
    assert url is not None
    response = await _post(url, json={"text": out.text.slack}, timeout=settings.slack_timeout_seconds,
                           retry_any=False, customer=CustomerUrl.of(settings))
    return HttpAnswer(response.status_code)


def sms_configured(settings: Settings) -> bool:
    return bool(settings.sms_account_sid and settings.sms_auth_token.get_secret_value() and settings.sms_from_number)


async def send_sms(settings: Settings, out: Outgoing) -> str | None:
    """Twilio's Messages API (or any compatible one at ``sms_api_base``); returns the message sid."""
    if not sms_configured(settings):
        raise NotConfigured("no SMS account (CREDITFLOW_SMS_ACCOUNT_SID, _AUTH_TOKEN, _FROM_NUMBER)")
    sid = settings.sms_account_sid
    url = f"{settings.sms_api_base.rstrip('/')}/2010-04-01/Accounts/{sid}/Messages.json"
    response = await _post(url, data={"To": out.destinations.sms_phone, "From": settings.sms_from_number,
                                      "Body": out.text.sms},
                           auth=(sid, settings.sms_auth_token.get_secret_value()),
                           timeout=settings.sms_timeout_seconds, retry_any=False)
    try:
        found = response.json().get("sid")
    except ValueError:
        return None
    return str(found) if found else None


def webhook_body(out: Outgoing) -> bytes:
    """The event as JSON (exact numbers, compact, keys sorted): the bytes that are signed and sent. ``data`` is the
    payload with its amounts also in the API's units (``creditflow.notify.events``, the OpenAPI ``webhooks``)."""
    event = {"id": out.event_id, "type": out.kind, "created": out.created,
             "account_id": out.destinations.account_id, "data": api_units(out.payload)}
    return simplejson.dumps(event, use_decimal=True, separators=(",", ":"), sort_keys=True).encode()


async def send_webhook(settings: Settings, out: Outgoing, *, now: float | None = None) -> HttpAnswer:
    """POST the signed event. Any non-2xx answer is retried (a customer's endpoint may be mid-deploy)."""
    url, secret = out.destinations.webhook_url, out.destinations.webhook_secret
    assert url is not None and secret is not None
    body = webhook_body(out)
    timestamp = int(time.time() if now is None else now)
    headers = {"Content-Type": "application/json", SIGNATURE_HEADER: signature_header(secret, timestamp, body),
               "Creditflow-Event-Id": out.event_id, "Creditflow-Event-Type": out.kind}
    response = await _post(url, content=body, headers=headers, timeout=settings.webhook_timeout_seconds,
                           retry_any=True, customer=CustomerUrl.of(settings))
    return HttpAnswer(response.status_code)
