"""The hosted checkout page, ``/checkout/{id}``: server-rendered (Jinja2), no build step, no CDN but Stripe.js.

No API key: the session id (``cs_`` + 122 random bits) is the capability, as a Stripe Checkout URL is. The page shows
what is bought (package, credits, price formatted from integer cents) and Stripe.js's card form, loaded from
``stripe_js_url`` (the emulator's test Stripe.js under ``creditflow dev``, ``https://js.stripe.com/v3/`` in
production). Paying, from ``static/checkout/checkout.js``:

1. ``POST /checkout/{id}/intent`` -> a SetupIntent client secret for the account's Stripe customer;
2. ``stripe.confirmCardSetup(secret, {payment_method: {card}})`` in the browser (the card never reaches creditflow);
3. ``POST /checkout/{id}/pay`` with the confirmed SetupIntent and card: the server charges it through the top-up
   workflow (``creditflow.payments.checkout.pay``) and answers where to go: ``success_url?session_id=...``, or a
   PaymentIntent secret to authenticate (3-D Secure) before paying again.

Both POSTs carry the session's CSRF token (``X-CSRF-Token``). An expired, paid or unknown session gets a clear page
(410, 200, 404), never a stack trace. Another helper's portal pages live in ``creditflow/web/portal*``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path as FilePath
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import HTMLResponse, Response
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from psycopg_pool import AsyncConnectionPool
from pydantic import Field

from creditflow.api.deps import get_app_settings, get_gateway, get_pool
from creditflow.api.exact_json import ExactJSONResponse, ExactRoute, respond
from creditflow.api.schemas import Strict
from creditflow.config import Settings
from creditflow.domain.topups import format_usd
from creditflow.errors import CreditflowError
from creditflow.payments import checkout
from creditflow.payments.gateway import StripeGateway

HERE = FilePath(__file__).resolve().parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static" / "checkout"
ASSETS = {"checkout.js": "text/javascript; charset=utf-8", "checkout.css": "text/css; charset=utf-8"}

router = APIRouter(tags=["checkout page"], include_in_schema=False, route_class=ExactRoute)

Pool = Annotated[AsyncConnectionPool, Depends(get_pool)]
AppSettings = Annotated[Settings, Depends(get_app_settings)]
Gateway = Annotated[StripeGateway, Depends(get_gateway)]
CsrfToken = Annotated[str | None, Header(alias="X-CSRF-Token")]


@lru_cache(maxsize=1)
def _templates() -> Environment:
    return Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(default=True),
                       undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else ""


def _security_headers(settings: Settings) -> dict[str, str]:
    """What the page may load: itself and Stripe.js (with what Stripe.js itself needs: its frames and API).
    Never framed (clickjacking), never cached, the URL (the capability) never sent as a referrer elsewhere."""
    js = _origin(settings.stripe_js_url)
    stripe_hosts = "https://*.js.stripe.com https://js.stripe.com"
    csp = "; ".join([
        "default-src 'self'",
        f"script-src 'self' {js} {stripe_hosts}",
        f"frame-src {js} {stripe_hosts} https://hooks.stripe.com",
        f"connect-src 'self' {js} https://api.stripe.com",
        "img-src 'self' data: https://*.stripe.com",
        "style-src 'self' 'unsafe-inline'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ])
    return {"Content-Security-Policy": csp, "X-Frame-Options": "DENY", "Cache-Control": "no-store",
            "Referrer-Policy": "same-origin", "X-Content-Type-Options": "nosniff"}


def _package_name(settings: Settings, session: checkout.CheckoutSession) -> str | None:
    return next((p.name for p in settings.topup_packages if p.id == session.package_id), None)


def _page(settings: Settings, template: str, status_code: int = 200, **context: object) -> HTMLResponse:
    html = _templates().get_template(f"checkout/{template}").render(**context)
    return HTMLResponse(html, status_code=status_code, headers=_security_headers(settings))


def _notice(settings: Settings, status_code: int, title: str, message: str, link: str | None = None,
            link_text: str | None = None) -> HTMLResponse:
    return _page(settings, "notice.html", status_code, title=title, message=message, link=link, link_text=link_text)


@router.get("/checkout/static/checkout.js")
async def checkout_js() -> Response:
    return _asset("checkout.js")


@router.get("/checkout/static/checkout.css")
async def checkout_css() -> Response:
    return _asset("checkout.css")


@lru_cache(maxsize=len(ASSETS))
def _asset_bytes(name: str) -> bytes:
    return (STATIC / name).read_bytes()


def _asset(name: str) -> Response:
    return Response(_asset_bytes(name), media_type=ASSETS[name],
                    headers={"Cache-Control": "public, max-age=300", "X-Content-Type-Options": "nosniff"})


@router.get("/checkout/{session_id}", response_class=HTMLResponse)
async def checkout_page(session_id: str, pool: Pool, settings: AppSettings) -> HTMLResponse:
    """The page for a session: the card form while it is open (to pay, or in setup mode to save the card); a clear
    notice once complete, expired or unknown."""
    try:
        session = await checkout.get_checkout_session(pool, session_id)
    except CreditflowError as exc:
        if exc.code != "unknown_checkout_session":
            return _notice(settings, exc.status, "Checkout unavailable",
                           "This page cannot be shown right now. Please try again in a moment.")
        return _notice(settings, 404, "Checkout not found",
                       "This checkout link is not valid. Ask for a new one where you started.")
    what = {"package_name": _package_name(settings, session), "credits": f"{session.credits:,}",
            "price": format_usd(session.amount_cents), "description": session.description,
            "setup": session.mode == checkout.SETUP}
    if session.status == checkout.COMPLETE:
        return _page(settings, "complete.html", 200, **what, continue_url=session.success_redirect)
    if session.status == checkout.EXPIRED:
        return _notice(settings, 410, "This checkout link has expired",
                       "Nothing was charged. Start again where you came from.", session.cancel_url, "Return")
    if not settings.stripe_publishable_key:
        return _notice(settings, 503, "Payments are not configured",
                       "Card payments are not set up on this server (CREDITFLOW_STRIPE_PUBLISHABLE_KEY).",
                       session.cancel_url, "Return")
    config = {"publishableKey": settings.stripe_publishable_key, "sessionId": session.id,
              "csrfToken": session.csrf_token, "intentUrl": f"/checkout/{session.id}/intent",
              "payUrl": f"/checkout/{session.id}/pay", "setup": session.mode == checkout.SETUP}
    return _page(settings, "pay.html", 200, **what, cancel_url=session.cancel_url, stripe_js_url=settings.stripe_js_url,
                 config=config, expires_at=session.expires_at.strftime("%Y-%m-%d %H:%M UTC"))


@router.post("/checkout/{session_id}/intent")
async def checkout_intent(session_id: str, pool: Pool, gateway: Gateway, csrf: CsrfToken = None) -> ExactJSONResponse:
    """A SetupIntent client secret for the page's card form (JSON)."""
    seti = await checkout.setup_card(pool, gateway, session_id, csrf)
    return respond({"setup_intent_id": seti.id, "client_secret": seti.client_secret})


class PayRequest(Strict):
    setup_intent: str = Field(max_length=300)
    payment_method: str = Field(max_length=300)


@router.post("/checkout/{session_id}/pay")
async def checkout_pay(session_id: str, req: PayRequest, request: Request, pool: Pool, gateway: Gateway,
                       settings: AppSettings, csrf: CsrfToken = None) -> ExactJSONResponse:
    """Charge the card confirmed on this page; answers ``{status: complete, redirect_url}``, ``{status:
    requires_action, client_secret}`` or ``{status: processing}`` (post again), or an error object."""
    result = await checkout.pay(pool, gateway, request.app.state.temporal.get, settings, session_id, csrf_token=csrf,
                                setup_intent_id=req.setup_intent, payment_method_id=req.payment_method)
    return respond(result.model_dump(exclude_none=True))
