"""A thin gateway over the official ``stripe`` SDK: customers, card payment methods and PaymentIntents.

Why a gateway: callers (API, activities) see our models and ``CreditflowError`` codes, never SDK
objects or exceptions, and every call gets the same policy:

* card declines and invalid requests are permanent: ``card_declined`` (402, Stripe's ``decline_code``
  kept in ``details``), ``unknown_payment_method`` (404), ``payment_method_invalid`` /
  ``payment_request_invalid`` (422), ``payment_provider_error`` (502, e.g. a bad API key);
* rate limits, Stripe 5xx and network errors are transient: retried here with exponential backoff
  (tenacity), then ``payment_provider_unavailable`` (503). The SDK's own retries are off so there is one
  retry policy, and the same idempotency key is sent on every attempt.

The SDK's client is synchronous (its async methods bind an httpx client to one event loop, while the API,
the worker and tests each run their own loop), so calls run in a thread: the event loop never blocks.
localstripe ignores idempotency keys: exactly-once is guarded by our own records (see ``customers.py``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any, Literal, TypeVar

import stripe
from pydantic import BaseModel
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential

from creditflow.config import Settings
from creditflow.domain.charges import PaymentIntentState  # noqa: F401 - re-exported (the model is pure)
from creditflow.errors import CreditflowError

log = logging.getLogger(__name__)
T = TypeVar("T")

# The key creditflow ships for localstripe. It cannot work against Stripe itself, so with no API base
# set it means "Stripe is not configured" and calls fail fast instead of going to the network.
PLACEHOLDER_API_KEY = "sk_test_creditflow_localstripe"
ACCOUNT_METADATA_KEY = "creditflow_account_id"
# What reconciliation lists from Stripe.
ListedResource = Literal["payment_intents", "refunds", "disputes"]


class CardDetails(BaseModel):
    """A card payment method as creditflow shows it. ``customer_id`` says whose it is (None: unattached)."""

    id: str
    customer_id: str | None
    brand: str
    last4: str
    exp_month: int
    exp_year: int
    name_on_card: str | None


class RefundState(BaseModel):
    """A Stripe refund as creditflow needs it. ``status``: ``succeeded``, ``pending``, ``requires_action``,
    ``failed`` or ``canceled``."""

    id: str
    status: str
    amount_cents: int
    payment_intent_id: str | None = None
    failure_reason: str | None = None
    metadata: dict[str, str] = {}


def _id_of(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return value.get("id")  # expanded


def _payment_intent(obj: Any) -> PaymentIntentState:
    pi: dict[str, Any] = obj.to_dict()
    error = pi.get("last_payment_error") or {}
    return PaymentIntentState(
        id=pi["id"], status=str(pi["status"]), amount_cents=int(pi["amount"]), currency=str(pi["currency"]),
        customer_id=_id_of(pi.get("customer")), payment_method_id=_id_of(pi.get("payment_method")),
        client_secret=pi.get("client_secret"), failure_code=error.get("code"),
        decline_code=error.get("decline_code"), failure_message=error.get("message"),
        metadata={str(k): str(v) for k, v in (pi.get("metadata") or {}).items()})


def _refund(obj: Any) -> RefundState:
    refund: dict[str, Any] = obj.to_dict()
    return RefundState(id=refund["id"], status=str(refund.get("status") or "pending"),
                       amount_cents=int(refund["amount"]),
                       payment_intent_id=_id_of(refund.get("payment_intent")),
                       failure_reason=refund.get("failure_reason"),
                       metadata={str(k): str(v) for k, v in (refund.get("metadata") or {}).items()})


class SetupIntentState(BaseModel):
    """A SetupIntent as the hosted checkout needs it: the card the browser confirmed (``payment_method_id``)."""

    id: str
    status: str
    client_secret: str | None = None
    customer_id: str | None = None
    payment_method_id: str | None = None
    metadata: dict[str, str] = {}


def _setup_intent(obj: Any) -> SetupIntentState:
    seti: dict[str, Any] = obj.to_dict()
    return SetupIntentState(id=seti["id"], status=str(seti["status"]), client_secret=seti.get("client_secret"),
                            customer_id=_id_of(seti.get("customer")),
                            payment_method_id=_id_of(seti.get("payment_method")),
                            metadata={str(k): str(v) for k, v in (seti.get("metadata") or {}).items()})


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, stripe.RateLimitError | stripe.APIConnectionError):
        return True
    # A plain APIError is Stripe's 5xx (or an unparseable answer); subclasses are permanent refusals.
    return type(exc) is stripe.APIError and (exc.http_status is None or exc.http_status >= 500)


def _card(obj: Any) -> CardDetails:
    pm: dict[str, Any] = obj.to_dict()  # StripeObjects are not dicts in 16.x
    card = pm.get("card") or {}
    billing = pm.get("billing_details") or {}
    customer = pm.get("customer")
    if customer is not None and not isinstance(customer, str):  # expanded
        customer = customer.get("id")
    return CardDetails(id=pm["id"], customer_id=customer, brand=str(card.get("brand") or "unknown"),
                       last4=str(card.get("last4") or ""), exp_month=int(card.get("exp_month") or 0),
                       exp_year=int(card.get("exp_year") or 0), name_on_card=billing.get("name"))


class StripeGateway:
    """Stripe customers and payment methods with creditflow's error codes and retry policy."""

    def __init__(self, api_key: str, api_base: str = "", *, max_attempts: int = 4,
                 retry_max_wait: float = 2.0, timeout: float = 30.0) -> None:
        self.configured = bool(api_base) or api_key != PLACEHOLDER_API_KEY
        self._max_attempts = max_attempts
        self._retry_max_wait = retry_max_wait
        self._client = stripe.StripeClient(
            api_key,
            base_addresses={"api": api_base.rstrip("/")} if api_base else None,
            max_network_retries=0,
            http_client=stripe.RequestsClient(timeout=timeout),
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> StripeGateway:
        return cls(settings.stripe_api_key.get_secret_value(), settings.stripe_api_base,
                   max_attempts=settings.stripe_max_attempts,
                   retry_max_wait=settings.stripe_retry_max_wait_seconds,
                   timeout=settings.stripe_timeout_seconds)

    # --- customers ---------------------------------------------------------------------------------

    async def create_customer(self, account_id: str, *, name: str | None = None, email: str | None = None,
                              idempotency_key: str) -> str:
        """A new Stripe customer tagged with the account id; returns its id. Callers guard exactly-once."""
        params: dict[str, Any] = {"metadata": {ACCOUNT_METADATA_KEY: account_id}}
        if name:
            params["name"] = name
        if email:
            params["email"] = email
        customer = await self._call(
            lambda: self._client.v1.customers.create(params=params,  # type: ignore[arg-type]
                                                     options={"idempotency_key": idempotency_key}),
            what="customer")
        return str(customer["id"])

    async def default_payment_method(self, customer_id: str) -> str | None:
        customer = await self._call(lambda: self._client.v1.customers.retrieve(customer_id), what="customer")
        settings = customer.to_dict().get("invoice_settings") or {}
        default = settings.get("default_payment_method")
        if default is not None and not isinstance(default, str):  # expanded
            default = default.get("id")
        return default

    async def set_default_payment_method(self, customer_id: str, payment_method_id: str | None) -> None:
        """Set (or with None clear) the customer's ``invoice_settings.default_payment_method``."""
        params: dict[str, Any] = {"invoice_settings": {"default_payment_method": payment_method_id or ""}}
        await self._call(lambda: self._client.v1.customers.update(customer_id, params=params),  # type: ignore[arg-type]
                         what="customer")

    # --- payment methods ---------------------------------------------------------------------------

    async def retrieve_payment_method(self, payment_method_id: str) -> CardDetails:
        pm = await self._call(lambda: self._client.v1.payment_methods.retrieve(payment_method_id),
                              what="payment_method")
        return _card(pm)

    async def attach_payment_method(self, payment_method_id: str, customer_id: str) -> CardDetails:
        """Attach to the customer; a declined card raises ``card_declined``."""
        pm = await self._call(
            lambda: self._client.v1.payment_methods.attach(payment_method_id, params={"customer": customer_id}),
            what="payment_method")
        return _card(pm)

    async def list_payment_methods(self, customer_id: str) -> list[CardDetails]:
        """The customer's cards (every page), in Stripe's order (newest first)."""

        def fetch() -> list[Any]:
            page = self._client.v1.payment_methods.list(params={"customer": customer_id, "type": "card",
                                                                "limit": 100})
            return list(page.auto_paging_iter())

        return [_card(pm) for pm in await self._call(fetch, what="customer")]

    async def detach_payment_method(self, payment_method_id: str) -> None:
        await self._call(lambda: self._client.v1.payment_methods.detach(payment_method_id),
                         what="payment_method")

    # --- payment intents ----------------------------------------------------------------------------

    async def create_payment_intent(self, *, amount_cents: int, currency: str = "usd", customer_id: str,
                                    payment_method_id: str | None, metadata: dict[str, str],
                                    idempotency_key: str) -> PaymentIntentState:
        """With a saved card: create and confirm off-session in one call (Stripe takes ``off_session`` only
        with ``confirm``), so the answer says whether it succeeded; a decline raises ``card_declined`` with
        ``details.payment_intent_id`` when Stripe names it. Without a card: an unconfirmed PaymentIntent
        whose ``client_secret`` the customer's browser confirms. Callers guard exactly-once (localstripe
        ignores the idempotency key)."""
        params: dict[str, Any] = {"amount": amount_cents, "currency": currency, "customer": customer_id,
                                  "metadata": metadata, "payment_method_types": ["card"]}
        if payment_method_id is not None:
            params.update(payment_method=payment_method_id, confirm=True, off_session=True)
        pi = await self._call(
            lambda: self._client.v1.payment_intents.create(params=params,  # type: ignore[arg-type]
                                                           options={"idempotency_key": idempotency_key}),
            what="payment_intent")
        return _payment_intent(pi)

    async def retrieve_payment_intent(self, payment_intent_id: str) -> PaymentIntentState:
        pi = await self._call(lambda: self._client.v1.payment_intents.retrieve(payment_intent_id),
                              what="payment_intent")
        return _payment_intent(pi)

    async def cancel_payment_intent(self, payment_intent_id: str) -> PaymentIntentState:
        """Cancel an unpaid PaymentIntent. One that can no longer be canceled (it succeeded meanwhile) is
        returned as it is, so the caller acts on its real status."""
        try:
            pi = await self._call(lambda: self._client.v1.payment_intents.cancel(payment_intent_id),
                                  what="payment_intent")
        except CreditflowError as exc:
            if exc.code != "payment_request_invalid":
                raise
            return await self.retrieve_payment_intent(payment_intent_id)
        return _payment_intent(pi)

    # --- setup intents (the hosted checkout's card form) ------------------------------------------------

    async def create_setup_intent(self, *, customer_id: str, metadata: dict[str, str],
                                  idempotency_key: str) -> SetupIntentState:
        """A SetupIntent for an off-session card of ``customer_id``: the browser confirms it with Stripe.js
        (``confirmCardSetup``), which leaves the card on the SetupIntent (and, on Stripe, attached to the customer)."""
        params: dict[str, Any] = {"customer": customer_id, "usage": "off_session", "payment_method_types": ["card"],
                                  "metadata": metadata}
        seti = await self._call(
            lambda: self._client.v1.setup_intents.create(params=params,  # type: ignore[arg-type]
                                                         options={"idempotency_key": idempotency_key}),
            what="setup_intent")
        return _setup_intent(seti)

    async def retrieve_setup_intent(self, setup_intent_id: str) -> SetupIntentState:
        return _setup_intent(await self._call(lambda: self._client.v1.setup_intents.retrieve(setup_intent_id),
                                              what="setup_intent"))

    # --- refunds -------------------------------------------------------------------------------------

    async def create_refund(self, payment_intent_id: str, amount_cents: int, *, idempotency_key: str,
                            metadata: dict[str, str]) -> RefundState:
        """Refund ``amount_cents`` of a succeeded PaymentIntent. Refusals (already refunded, not paid, no such
        PaymentIntent) are permanent (``payment_request_invalid`` / ``payment_provider_error``); outages are
        retried, then ``payment_provider_unavailable``. Callers guard exactly-once (see ``refunds.py``)."""
        params: dict[str, Any] = {"payment_intent": payment_intent_id, "amount": amount_cents, "metadata": metadata}
        refund = await self._call(
            lambda: self._client.v1.refunds.create(params=params,  # type: ignore[arg-type]
                                                   options={"idempotency_key": idempotency_key}),
            what="refund")
        return _refund(refund)

    async def retrieve_refund(self, refund_id: str) -> RefundState:
        return _refund(await self._call(lambda: self._client.v1.refunds.retrieve(refund_id), what="refund"))

    async def retrieve_dispute(self, dispute_id: str) -> dict[str, Any]:
        """A dispute as Stripe knows it now (reconciliation re-checks the ones still open in the ledger)."""
        return await self._call(lambda: self._client.v1.disputes.retrieve(dispute_id).to_dict(), what="dispute")

    async def list_refunds(self, payment_intent_id: str) -> list[RefundState]:
        """Every refund of a PaymentIntent, as Stripe knows them (whoever made them)."""

        def fetch() -> list[Any]:
            page = self._client.v1.refunds.list(params={"payment_intent": payment_intent_id, "limit": 100})
            return list(page.auto_paging_iter())

        return [_refund(r) for r in await self._call(fetch, what="refunds")]

    # --- listing (reconciliation) ----------------------------------------------------------------------

    async def list_created_since(self, resource: ListedResource, since: datetime, *,
                                 server_filter: bool) -> list[dict[str, Any]]:
        """Every PaymentIntent, refund or dispute created at or after ``since``, as plain dicts, through the SDK's
        auto-pagination. ``server_filter`` asks Stripe to filter on ``created``; without it everything is listed
        and filtered here (the emulator refuses list filters). A provider without the list (the emulator has no
        disputes) raises ``payment_provider_error``."""
        since_ts = int(since.timestamp())
        params: dict[str, Any] = {"limit": 100}
        if server_filter:
            params["created"] = {"gte": since_ts}
        service = {"payment_intents": self._client.v1.payment_intents, "refunds": self._client.v1.refunds,
                   "disputes": self._client.v1.disputes}[resource]

        def fetch() -> list[dict[str, Any]]:
            listed = (obj.to_dict() for obj in service.list(params=params).auto_paging_iter())  # type: ignore[attr-defined]
            return [obj for obj in listed if int(obj.get("created") or 0) >= since_ts]

        return await self._call(fetch, what=resource)

    # --- policy --------------------------------------------------------------------------------------

    async def _call(self, fn: Callable[[], T], *, what: str) -> T:
        """Run ``fn`` in a thread with the retry policy; map Stripe errors to ``CreditflowError``."""
        if not self.configured:
            raise CreditflowError("payment_provider_not_configured",
                                  "Stripe is not configured (CREDITFLOW_STRIPE_API_KEY)")
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception(_transient),
                stop=stop_after_attempt(self._max_attempts),
                wait=wait_exponential(multiplier=0.25, max=self._retry_max_wait),
                reraise=True,
            ):
                with attempt:
                    return await asyncio.to_thread(fn)
        except stripe.StripeError as exc:
            raise _map_error(exc, what) from exc
        raise AssertionError("unreachable")


def _map_error(exc: stripe.StripeError, what: str) -> CreditflowError:
    stripe_code = getattr(exc, "code", None)
    details: dict[str, object] = {"stripe_code": stripe_code} if stripe_code else {}
    if _transient(exc):
        log.warning("Stripe unavailable after retries: %s", exc)
        return CreditflowError("payment_provider_unavailable",
                               "the payment provider is unavailable; try again later", details=details)
    if isinstance(exc, stripe.CardError):
        error = exc.error
        decline_code = getattr(error, "decline_code", None) if error is not None else None
        details["decline_code"] = decline_code  # Stripe's reason (insufficient_funds, ...), None if not given
        payment_intent = getattr(error, "payment_intent", None) if error is not None else None
        if payment_intent is not None:  # Stripe names the PaymentIntent a declined confirmation left behind
            details["payment_intent_id"] = _id_of(payment_intent)
        return CreditflowError("card_declined", exc.user_message or "the card was declined", details=details)
    if isinstance(exc, stripe.InvalidRequestError):
        if exc.http_status == 404 or stripe_code == "resource_missing":
            if what == "payment_method":
                return CreditflowError("unknown_payment_method", "no such payment method")
            if what == "setup_intent":  # named by a browser (the checkout page): its input, not our fault
                return CreditflowError("payment_method_invalid", "no such setup intent")
            return CreditflowError("payment_provider_error", f"Stripe has no such {what}", details=details)
        if what == "payment_method":
            return CreditflowError("payment_method_invalid", exc.user_message or "the payment method is not valid",
                                   details=details)
        return CreditflowError("payment_request_invalid", exc.user_message or "Stripe refused the request",
                               details=details)
    log.error("Stripe refused a call: %r", exc)
    return CreditflowError("payment_provider_error", "the payment provider refused the request", details=details)
