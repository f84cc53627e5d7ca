"""The customer billing portal (docs/portal.md): server-rendered pages opened by a portal session.

Why it reuses the API's handlers: every page reads and every form writes through the very functions the
``/api/v1`` routes run (validation, idempotency, workflows, error codes), called with the session's principal
(its own account, ``PORTAL_SESSION_SCOPES``, checked against the one route table). The portal adds no query and
no business rule of its own; a refusal by that code (another account's invoice or card, an amount out of range)
is shown on the page with the API's status code and message.

The pages are Starlette routes (HTML, cookie-authenticated, outside ``/api/v1`` and outside the OpenAPI schema);
only ``POST /api/v1/portal/sessions`` (admin key) is an API route.
"""

from __future__ import annotations

import csv
import io
import json
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs, urlsplit

from fastapi import APIRouter, Depends, Request
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from psycopg_pool import AsyncConnectionPool
from pydantic import AfterValidator, BaseModel, Field, ValidationError
from starlette.responses import HTMLResponse, RedirectResponse, Response

from creditflow.api import agents as agents_api
from creditflow.api import (
    alerts,
    auto_recharge,
    billing,
    invoices,
    limits,
    notification_channels,
    payment_methods,
    plans,
    subscription,
    topups,
)
from creditflow.api import checkout as checkout_api
from creditflow.api.checkout import public_base_url
from creditflow.api.deps import get_app_settings, get_pool, require
from creditflow.api.exact_json import ExactJSONResponse, ExactRoute, respond
from creditflow.api.keys import Principal, Scope
from creditflow.api.schemas import Strict
from creditflow.api.scopes import granted, required_scopes
from creditflow.config import Settings
from creditflow.errors import CreditflowError
from creditflow.ids import check_id
from creditflow.ledger.alerts import CHANNELS
from creditflow.web import sessions
from creditflow.web.sessions import COOKIE_NAME, PortalSession

HERE = Path(__file__).resolve().parent
STATIC_CSS = HERE / "static" / "portal.css"
MAX_FORM_BYTES = 20_000

# --- the API route: the platform creates a session ---------------------------------------------------------------


def _return_url(value: str) -> str:
    """Where "Back" leads: an absolute http(s) URL (never javascript: or a relative path)."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc or any(c in value for c in "\r\n\t\x00 "):
        raise ValueError("must be an absolute http(s) URL")
    return value


ReturnUrl = Annotated[str, Field(min_length=8, max_length=2000), AfterValidator(_return_url)]


class PortalSessionCreate(Strict):
    account_id: str = Field(description="The account whose portal opens.")
    return_url: ReturnUrl = Field(description="The platform's page the portal links back to.")


class PortalSessionOut(BaseModel):
    id: str
    account_id: str
    url: str = Field(description="Single-use link: give it to the customer's browser now; it opens the portal once.")
    expires_at: datetime = Field(description="The link works until then (CREDITFLOW_PORTAL_LINK_TTL_MINUTES).")
    return_url: str


api_router = APIRouter(prefix="/api/v1/portal", tags=["portal"], route_class=ExactRoute)


@api_router.post("/sessions", response_model=PortalSessionOut, response_class=ExactJSONResponse, status_code=201,
                 responses={404: {"description": "unknown_account"},
                            422: {"description": "validation_error (return_url not an absolute http(s) URL), "
                                                 "invalid_id"}})
async def create_portal_session(req: PortalSessionCreate, request: Request,
                                principal: Annotated[Principal, Depends(require(Scope.ADMIN))],
                                pool: Annotated[AsyncConnectionPool, Depends(get_pool)],
                                settings: Annotated[Settings, Depends(get_app_settings)]) -> ExactJSONResponse:
    """A customer portal session for an account: a short-lived, single-use URL that starts a dashboard session
    (billing:read, billing:write, payments:write on that account only) in the browser that opens it."""
    account = check_id(req.account_id, "acc", "account_id")
    created = await sessions.create(pool, account, req.return_url,
                                    timedelta(minutes=settings.portal_link_ttl_minutes), principal.key_id)
    base = public_base_url(settings, request).rstrip("/")
    return respond(PortalSessionOut(id=created.id, account_id=account, url=f"{base}/portal/start/{created.token}",
                                    expires_at=created.expires_at, return_url=req.return_url), 201)


# --- rendering ---------------------------------------------------------------------------------------------------


def _credits(value: Any) -> str:
    """Exact: ints and Decimals only (amounts come from JSON parsed with Decimal), grouped thousands."""
    if value is None or value == "":
        return "—"
    return format(value, ",") if isinstance(value, int) else format(Decimal(value), ",f")


def _usd(value: Any) -> str:
    if value is None or value == "":
        return "—"
    amount = Decimal(value).quantize(Decimal("0.01"))
    return ("-$" if amount < 0 else "$") + format(abs(amount), ",f")


def _credits_usd(value: Any) -> str:
    """Credits as USD (1 credit = $0.01), exact: cents always shown, a sub-cent part kept (-2.5 -> -$0.025)."""
    if value is None or value == "":
        return "—"
    amount = Decimal(value).scaleb(-2)
    if amount == amount.quantize(Decimal("0.01")):
        amount = amount.quantize(Decimal("0.01"))
    return ("-$" if amount < 0 else "$") + format(abs(amount), ",f")


def _cents(value: Any) -> str:
    return _usd(Decimal(int(value)) / 100)


def _when(value: Any, with_time: bool = True) -> str:
    if not value:
        return "—"
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%d %H:%M UTC" if with_time else "%Y-%m-%d")


ENV = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=True, undefined=StrictUndefined,
                  trim_blocks=True, lstrip_blocks=True)
ENV.filters.update(credits=_credits, usd=_usd, credits_usd=_credits_usd, cents=_cents, when=_when,
                   day=lambda v: _when(v, False))

# What a redirect after a successful form says (fixed texts: nothing from the URL is echoed).
NOTICES = {
    "topup": "Payment received: your credits were added.", "checkout": "Payment received: your credits were added.",
    "topup_pending": "Payment is processing: the credits "
    "arrive when it settles.", "paid": "Invoice paid.", "pay_pending": "The payment is processing.",
    "default": "Default card changed.", "card_added": "Card added.", "deleted": "Card removed.",
    "paused": "Agent paused.",
    "resumed": "Agent resumed.", "agent_saved": "Agent saved.", "limits": "Spend limits saved.",
    "recharge": "Auto-recharge saved.", "spend_on": "Spend management turned on: your limits apply.",
    "spend_off": "Spend management turned off: your limits are kept but not enforced.",
    "notifications": "Notifications saved.", "alerts": "Low-balance alerts saved.",
    "channels": "Notification destinations saved.", "tax_added": "Tax registration added.",
    "tax_deleted": "Tax registration removed.",
    "plan": "Plan changed.", "address": "Invoice address saved.", "email": "Billing email saved.",
}

NAV = [("overview", "/portal", "Overview"), ("usage", "/portal/usage", "Usage"), ("buy", "/portal/buy", "Buy credits"),
       ("invoices", "/portal/invoices", "Invoices"), ("cards", "/portal/payment-methods", "Payment methods"),
       ("history", "/portal/history", "Balance history"), ("plan", "/portal/plan", "Plan"),
       ("recharge", "/portal/auto-recharge", "Auto-recharge"), ("spend", "/portal/spend", "Spend management"),
       ("agents", "/portal/agents", "Agents"), ("details", "/portal/details", "Billing details")]

SECURITY_HEADERS = {
    "Cache-Control": "no-store", "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'self'; img-src * data:; style-src 'self'; script-src 'none'; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
}


def render(request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
    settings: Settings = request.app.state.settings
    values: dict[str, Any] = {"session": None, "notice": None, "error": None, "active": "", **context}
    html = ENV.get_template(f"portal/{template}").render(
        platform_name=settings.platform_name, logo_url=settings.platform_logo_url, nav=NAV, **values)
    return HTMLResponse(html, status, headers=SECURITY_HEADERS)


def message(request: Request, status: int, title: str, text: str, return_url: str | None = None) -> HTMLResponse:
    return render(request, "message.html", status, title=title, text=text, return_url=return_url)


# --- the session around every page -------------------------------------------------------------------------------


def data(response: Response) -> Any:
    """An API handler's JSON answer with exact numbers (Decimal, never float)."""
    return json.loads(bytes(response.body), parse_float=Decimal)


@dataclass
class Ctx:
    """One page request: the session, the API code's dependencies, the form posted."""

    request: Request
    session: PortalSession
    form: dict[str, str] = field(default_factory=dict)

    @property
    def pool(self) -> AsyncConnectionPool:
        return self.request.app.state.pool

    @property
    def settings(self) -> Settings:
        return self.request.app.state.settings

    @property
    def principal(self) -> Principal:
        return self.session.principal

    def may(self, method: str, path: str) -> Principal:
        """The session's principal if the one route table admits it to the API route whose code a page reuses."""
        needed = required_scopes(method, path)
        if Scope.ADMIN in needed or not needed & granted(self.principal.scopes):
            raise CreditflowError("insufficient_scope", "a portal session cannot do this")
        return self.principal

    async def call(self, method: str, path: str, handler: Callable[..., Awaitable[Response]], *args: Any,
                   **kwargs: Any) -> Any:
        """Run the API route's own handler as the session's principal; its JSON answer, exact."""
        return data(await handler(*args, principal=self.may(method, path), **kwargs))

    def render(self, template: str, active: str, status: int = 200, **context: Any) -> HTMLResponse:
        notice = NOTICES.get(self.request.query_params.get("ok", ""))
        context.setdefault("error", None)
        return render(self.request, template, status, session=self.session, active=active, notice=notice,
                      csrf=self.session.csrf_token, **context)


Handler = Callable[[Ctx], Awaitable[Response]]


async def _form(request: Request) -> dict[str, str] | None:
    """An urlencoded form (what the pages post); None when it is not one or is too big."""
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
        return None
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        return None
    try:
        parsed = parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=100)
    except (UnicodeDecodeError, ValueError):
        return None
    return {k: v[-1].strip() for k, v in parsed.items() if "\x00" not in v[-1]}


def _idle(request: Request) -> timedelta:
    return timedelta(minutes=request.app.state.settings.portal_session_idle_minutes)


def page(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """Authenticate by the session cookie; on POST require the session's CSRF token; render refusals as pages."""

    async def endpoint(request: Request) -> Response:
        session = await sessions.resume(request.app.state.pool, request.cookies.get(COOKIE_NAME), _idle(request))
        if session is None:
            return message(request, 401, "Your billing session has ended",
                           "Open the billing portal again from your account on the platform.")
        ctx = Ctx(request, session)
        if request.method == "POST":
            form = await _form(request)
            if form is None or not session.csrf_ok(form.get("csrf_token")):
                return message(request, 403, "This form has expired",
                               "The form did not carry this session's security token. Go back, reload the page "
                               "and try again.", session.return_url)
            ctx.form = form
        try:
            return await handler(ctx)
        except CreditflowError as exc:  # a page's own read refused (Stripe or Temporal unavailable...): say so
            return message(request, exc.status, "This page cannot be shown", exc.message,
                           session.return_url)

    return endpoint


async def fail(ctx: Ctx, view: Handler, exc: CreditflowError | ValidationError) -> Response:
    """Show the page again with the refusal and the API's status code; nothing was changed."""
    if isinstance(exc, ValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'form'}: {e['msg']}" for e in exc.errors())
        status, text = 422, f"Please check the form: {problems}"
    else:
        status, text = exc.status, exc.message
    ctx.request.state.portal_error = text
    again = await view(ctx)
    again.status_code = status
    return again


def done(notice: str, to: str) -> RedirectResponse:
    return RedirectResponse(f"{to}?ok={notice}", 303, headers=SECURITY_HEADERS)


def error_of(ctx: Ctx) -> str | None:
    return getattr(ctx.request.state, "portal_error", None)


def _blank_none(value: str | None) -> str | None:
    return value if value else None


# --- pages -------------------------------------------------------------------------------------------------------


async def start(request: Request) -> Response:
    """Open a session link: once, before it expires. Sets the session cookie and goes to the overview."""
    token = request.path_params["token"]
    try:
        opened = await sessions.open_link(request.app.state.pool, token, _idle(request))
    except sessions.LinkRefused as refused:
        texts = {"expired": ("This link has expired", 410, "Billing links work for a few minutes only."),
                 "used": ("This link was already used", 410, "Each billing link opens the portal once."),
                 "unknown": ("This link is not valid", 404, "Check that you copied the whole link.")}
        title, status, text = texts[refused.problem]
        return message(request, status, title, text + " Open the billing portal again from your account.")
    response = RedirectResponse("/portal", 303, headers=SECURITY_HEADERS)
    response.set_cookie(COOKIE_NAME, opened.cookie, httponly=True, samesite="lax", path="/portal",
                        secure=request.url.scheme == "https")
    return response


async def overview(ctx: Ctx) -> Response:
    pool, settings = ctx.pool, ctx.settings
    balance = await ctx.call("GET", "/api/v1/billing/balance", billing.balance, pool=pool)
    spend = await ctx.call("GET", "/api/v1/billing/spend", limits.get_spend, pool=pool)
    profile = await ctx.call("GET", "/api/v1/billing/profile", invoices.get_billing_profile, pool=pool)
    recharge = await ctx.call("GET", "/api/v1/billing/auto-recharge", auto_recharge.get_auto_recharge, pool=pool,
                              settings=settings)
    limit_set = await ctx.call("GET", "/api/v1/billing/limits", limits.get_limits, pool=pool)
    plan = await ctx.call("GET", "/api/v1/billing/subscription", subscription.get_subscription, pool=pool,
                          catalog=ctx.request.app.state.plan_catalog)
    spend_on = limit_set["enabled"] and any(limit_set[k] is not None
                                            for k in ("daily_limit", "monthly_limit", "per_agent_limit"))
    return ctx.render("overview.html", "overview", balance=balance, spend=spend, profile=profile, recharge=recharge,
                      spend_on=spend_on, plan=plan)


HISTORY_PAGE = 25


async def history(ctx: Ctx) -> Response:
    after = _blank_none(ctx.request.query_params.get("after"))
    before = _blank_none(ctx.request.query_params.get("before"))
    page_data = await ctx.call("GET", "/api/v1/billing/transactions", billing.transactions, pool=ctx.pool,
                               limit=HISTORY_PAGE, starting_after=after, ending_before=before)
    items = page_data["items"]
    older = items[-1]["id"] if items and (page_data["has_more"] or before) else None
    newer = items[0]["id"] if items and (after or (before and page_data["has_more"])) else None
    return ctx.render("history.html", "history", items=items, older=older, newer=newer)


async def history_csv(ctx: Ctx) -> Response:
    """Every balance change, newest first, as CSV (paged through the same API code)."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["id", "created_at", "type", "description", "amount_credits", "balance_after_credits"])
    after: str | None = None
    while True:
        got = await ctx.call("GET", "/api/v1/billing/transactions", billing.transactions, pool=ctx.pool, limit=500,
                             starting_after=after)
        for t in got["items"]:
            writer.writerow([t["id"], t["created_at"], t["type"], t["description"], str(t["amount"]),
                             str(t["balance_after"])])
        if not got["has_more"] or not got["items"]:
            break
        after = got["items"][-1]["id"]
    return Response(out.getvalue(), media_type="text/csv; charset=utf-8",
                    headers={**SECURITY_HEADERS,
                             "Content-Disposition": 'attachment; filename="balance-history.csv"'})


async def _cards(ctx: Ctx) -> list[dict[str, Any]]:
    got = await ctx.call("GET", "/api/v1/billing/payment-methods", payment_methods.list_payment_methods,
                         pool=ctx.pool, gateway=ctx.request.app.state.gateway)
    return list(got["items"])


async def invoice_list(ctx: Ctx) -> Response:
    got = await ctx.call("GET", "/api/v1/billing/invoices", invoices.list_invoices, pool=ctx.pool, limit=100)
    due = [i for i in got["items"] if i["payment_due"]]
    past = [i for i in got["items"] if not i["payment_due"]]
    return ctx.render("invoices.html", "invoices", error=error_of(ctx), due=due, past=past,
                      payments_due=got["payments_due"], cards=await _cards(ctx) if due else [])


async def pay_invoice(ctx: Ctx) -> Response:
    try:
        invoice_id = ctx.form.get("invoice_id", "")
        req = invoices.PayInvoiceRequest(payment_method_id=_blank_none(ctx.form.get("payment_method_id")))
        response = await invoices.pay_invoice(
            invoice_id, req, principal=ctx.may("POST", "/api/v1/billing/invoices/{invoice_id}/pay"), pool=ctx.pool,
            request=ctx.request, gateway=ctx.request.app.state.gateway)
    except (CreditflowError, ValidationError) as exc:
        return await fail(ctx, invoice_list, exc)
    return done("paid" if response.status_code == 200 else "pay_pending", "/portal/invoices")


async def invoice_pdf(ctx: Ctx) -> Response:
    try:
        response = await invoices.get_invoice_pdf(
            ctx.request.path_params["invoice_id"], principal=ctx.may(
                "GET", "/api/v1/billing/invoices/{invoice_id}/pdf"), pool=ctx.pool)
    except CreditflowError as exc:
        return await fail(ctx, invoice_list, exc)
    response.headers.update({"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})
    return response


async def cards(ctx: Ctx) -> Response:
    return ctx.render("cards.html", "cards", error=error_of(ctx), cards=await _cards(ctx),
                      request_id=f"portal-{uuid.uuid4().hex}")


async def card_add(ctx: Ctx) -> Response:
    """A card is added on the hosted checkout page (its one Stripe.js card form) in setup mode: nothing is charged,
    the card is saved on the account (the default if asked, or if there is none), and past-due invoices are tried
    with it, as when a card is added through the API. The form's request id is the session's idempotency key."""
    base = public_base_url(ctx.settings, ctx.request).rstrip("/")
    try:
        body = checkout_api.CheckoutSessionCreate(
            mode="setup", set_default=ctx.form.get("set_default") == "on",
            success_url=f"{base}/portal/payment-methods?ok=card_added", cancel_url=f"{base}/portal/payment-methods",
            idempotency_key=ctx.form.get("request_id") or None)
        created = await ctx.call("POST", "/api/v1/checkout/sessions", checkout_api.create_checkout_session, body,
                                 pool=ctx.pool, settings=ctx.settings, request=ctx.request)
    except (CreditflowError, ValidationError) as exc:
        return await fail(ctx, cards, exc)
    return RedirectResponse(str(created["url"]), 303, headers=SECURITY_HEADERS)


async def card_default(ctx: Ctx) -> Response:
    try:
        await ctx.call("POST", "/api/v1/billing/payment-methods/{payment_method_id}/default",
                       payment_methods.set_default_payment_method, ctx.form.get("payment_method_id", ""),
                       pool=ctx.pool, gateway=ctx.request.app.state.gateway)
    except CreditflowError as exc:
        return await fail(ctx, cards, exc)
    return done("default", "/portal/payment-methods")


async def card_delete(ctx: Ctx) -> Response:
    try:
        await ctx.call("DELETE", "/api/v1/billing/payment-methods/{payment_method_id}",
                       payment_methods.detach_payment_method, ctx.form.get("payment_method_id", ""),
                       pool=ctx.pool, gateway=ctx.request.app.state.gateway)
    except CreditflowError as exc:
        return await fail(ctx, cards, exc)
    return done("deleted", "/portal/payment-methods")


async def agent_list(ctx: Ctx) -> Response:
    got = await ctx.call("GET", "/api/v1/agents", agents_api.list_agents, pool=ctx.pool)
    return ctx.render("agents.html", "agents", error=error_of(ctx), agents=got["items"])


async def agent_action(ctx: Ctx) -> Response:
    if ctx.request.path_params["action"] == "settings":
        return await agent_settings(ctx)
    if ctx.request.path_params["action"] not in ("pause", "resume"):
        return message(ctx.request, 404, "Not found", "There is no such page.")
    paused = ctx.request.path_params["action"] == "pause"
    handler = agents_api.pause_agent if paused else agents_api.resume_agent
    try:
        await ctx.call("POST", f"/api/v1/agents/{{agent_id}}/{'pause' if paused else 'resume'}", handler,
                       ctx.form.get("agent_id", ""), agents_api.AgentAction(reason="from the billing portal"),
                       request=ctx.request)
    except (CreditflowError, ValidationError) as exc:
        return await fail(ctx, agent_list, exc)
    return done("paused" if paused else "resumed", "/portal/agents")


async def agent_settings(ctx: Ctx) -> Response:
    """Seed 001's choice when plan credits run out: Stop, or Use Balance (the API's PATCH /agents/{id})."""
    try:
        req = agents_api.AgentPatch(on_plan_exhausted=ctx.form.get("on_plan_exhausted") or None)
        await ctx.call("PATCH", "/api/v1/agents/{agent_id}", agents_api.patch_agent, ctx.form.get("agent_id", ""),
                       req, request=ctx.request, pool=ctx.pool)
    except (CreditflowError, ValidationError) as exc:
        return await fail(ctx, agent_list, exc)
    return done("agent_saved", "/portal/agents")


async def spend(ctx: Ctx) -> Response:
    current = await ctx.call("GET", "/api/v1/billing/limits", limits.get_limits, pool=ctx.pool)
    used = await ctx.call("GET", "/api/v1/billing/spend", limits.get_spend, pool=ctx.pool)
    notify = await ctx.call("GET", "/api/v1/billing/alerts", alerts.get_alerts, pool=ctx.pool)
    channels = await ctx.call("GET", "/api/v1/billing/notification-channels",
                              notification_channels.get_notification_channels, pool=ctx.pool)
    return ctx.render("spend.html", "spend", error=error_of(ctx), limits=current, spend=used, alerts=notify,
                      channels=channels, webhook_secret=getattr(ctx.request.state, "webhook_secret", None),
                      alert_rows=alert_rows(notify["alerts"]), channel_names=CHANNELS)


async def save_notifications(ctx: Ctx) -> Response:
    """Seed 002's daily usage notification threshold and webhook URL (the API's alerts and channels code)."""
    try:
        threshold = alerts.AlertsRequest(daily_usage_threshold=_blank_none(ctx.form.get("daily_usage_threshold")))
        hook = notification_channels.NotificationChannelsUpdate(webhook_url=_blank_none(ctx.form.get("webhook_url")))
        # The webhook URL first: it is the likelier refusal (https, public host), and then nothing is saved.
        saved = await ctx.call("PUT", "/api/v1/billing/notification-channels",
                               notification_channels.put_notification_channels, hook, pool=ctx.pool,
                               settings=ctx.settings)
        await ctx.call("PUT", "/api/v1/billing/alerts", alerts.put_alerts, threshold, pool=ctx.pool)
    except (CreditflowError, ValidationError) as exc:
        return await fail(ctx, spend, exc)
    if saved.get("webhook_secret"):  # shown once, by this answer only: no redirect, or it is lost
        ctx.request.state.webhook_secret = saved["webhook_secret"]
        return await spend(ctx)
    return done("notifications", "/portal/spend")


def alert_rows(saved: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The alert form's rows: each saved alert, then blank ones to add (up to the API's maximum)."""
    blank = {"threshold": None, "channels": ["email"], "enabled": True}
    return [*saved, *[blank] * max(0, min(2, alerts.MAX_ALERTS - len(saved)))]


async def save_alerts(ctx: Ctx) -> Response:
    """Low-balance alerts: the whole list from the form's rows (a row with no threshold is dropped: that removes
    it), saved by the API's alerts code, which keeps the daily usage threshold as it is (not in the request)."""
    rows = []
    for i in range(alerts.MAX_ALERTS):
        threshold = ctx.form.get(f"alert-{i}-threshold", "")
        if not threshold:
            continue
        rows.append({"threshold": threshold, "enabled": ctx.form.get(f"alert-{i}-enabled") == "on",
                     "channels": [c for c in CHANNELS if ctx.form.get(f"alert-{i}-{c}") == "on"]})
    try:
        req = alerts.AlertsRequest(alerts=rows)
        await ctx.call("PUT", "/api/v1/billing/alerts", alerts.put_alerts, req, pool=ctx.pool)
    except (CreditflowError, ValidationError) as exc:
        return await fail(ctx, spend, exc)
    return done("alerts", "/portal/spend")


async def save_channels(ctx: Ctx) -> Response:
    """Where notifications go (email instead of the billing email, Slack, SMS), by the API's channels code. The
    Slack URL is a credential the API never shows back: an empty field keeps it, "remove" removes it."""
    values: dict[str, Any] = {"email": _blank_none(ctx.form.get("email")),
                              "sms_phone": _blank_none(ctx.form.get("sms_phone"))}
    if ctx.form.get("remove_slack") == "on":
        values["slack_webhook_url"] = None
    elif ctx.form.get("slack_webhook_url"):
        values["slack_webhook_url"] = ctx.form["slack_webhook_url"]
    try:
        req = notification_channels.NotificationChannelsUpdate(**values)
        await ctx.call("PUT", "/api/v1/billing/notification-channels",
                       notification_channels.put_notification_channels, req, pool=ctx.pool, settings=ctx.settings)
    except (CreditflowError, ValidationError) as exc:
        return await fail(ctx, spend, exc)
    return done("channels", "/portal/spend")


async def save_spend(ctx: Ctx) -> Response:
    try:
        req = limits.LimitsRequest(**{k: _blank_none(ctx.form.get(k)) for k in ("daily_limit", "monthly_limit",
                                                                                 "per_agent_limit")},
                                   action_on_limit=_blank_none(ctx.form.get("action_on_limit")))
        await ctx.call("PUT", "/api/v1/billing/limits", limits.put_limits, req, pool=ctx.pool)
    except (CreditflowError, ValidationError) as exc:
        return await fail(ctx, spend, exc)
    return done("limits", "/portal/spend")


async def toggle_spend(ctx: Ctx) -> Response:
    """Seed 002's Spend management switch: off keeps the limits and enforces none, on enforces them again (the
    API's ``enabled``; nothing else in the limits changes)."""
    on = ctx.form.get("enabled") == "on"
    try:
        await ctx.call("PUT", "/api/v1/billing/limits", limits.put_limits, limits.LimitsRequest(enabled=on),
                       pool=ctx.pool)
    except (CreditflowError, ValidationError) as exc:
        return await fail(ctx, spend, exc)
    return done("spend_on" if on else "spend_off", "/portal/spend")


async def recharge(ctx: Ctx) -> Response:
    current = await ctx.call("GET", "/api/v1/billing/auto-recharge", auto_recharge.get_auto_recharge, pool=ctx.pool,
                             settings=ctx.settings)
    return ctx.render("auto_recharge.html", "recharge", error=error_of(ctx), recharge=current,
                      cards=await _cards(ctx))


async def save_recharge(ctx: Ctx) -> Response:
    try:
        req = auto_recharge.AutoRechargeRequest(
            enabled=ctx.form.get("enabled") == "on", threshold=_blank_none(ctx.form.get("threshold")),
            recharge_amount=_blank_none(ctx.form.get("recharge_amount")),
            payment_method_id=_blank_none(ctx.form.get("payment_method_id")))
        await ctx.call("PUT", "/api/v1/billing/auto-recharge", auto_recharge.put_auto_recharge, req, pool=ctx.pool,
                       gateway=ctx.request.app.state.gateway, settings=ctx.settings)
    except (CreditflowError, ValidationError) as exc:
        return await fail(ctx, recharge, exc)
    return done("recharge", "/portal/auto-recharge")


async def usage(ctx: Ctx) -> Response:
    balance = await ctx.call("GET", "/api/v1/billing/balance", billing.balance, pool=ctx.pool)
    start = datetime.fromisoformat(str(balance["period_start"]).replace("Z", "+00:00")) \
        if balance.get("period_start") else None
    rollups = (await ctx.call("GET", "/api/v1/billing/usage", billing.usage, pool=ctx.pool, start=start))["items"]
    # Per agent over the same window as the per-day chart (the billing period), not the calendar month.
    per_agent = (await ctx.call("GET", "/api/v1/billing/usage", billing.usage, pool=ctx.pool, start=start,
                                group_by="agent"))["items"]
    agents = (await ctx.call("GET", "/api/v1/agents", agents_api.list_agents, pool=ctx.pool))["items"]
    days = _period_days(start, datetime.now(UTC))
    rows = agent_rows(per_agent, agents)
    return ctx.render("usage.html", "usage", chart=usage_chart(rollups, days), rollups=rollups, agent_rows=rows,
                      agent_bars=agent_chart(rows),
                      agent_window="this billing period" if balance.get("plan_id") else "this month",
                      period_start=balance.get("period_start"), period_end=balance.get("period_end"))


CHANNEL_COLOURS = ["#2563eb", "#16a34a", "#d97706", "#9333ea", "#dc2626", "#0891b2", "#4b5563"]


@dataclass
class Chart:
    width: int
    height: int
    bars: list[dict[str, Any]]
    legend: list[tuple[str, str]]
    top: Decimal
    days: list[str]


def _period_days(start: datetime | None, now: datetime) -> list[str]:
    """Every UTC day of the period so far (a day without usage is an empty slot, so the axis is time)."""
    if start is None:
        return []
    first, days = start.astimezone(UTC).date(), []
    while first <= now.date() and len(days) < 400:
        days.append(first.isoformat())
        first += timedelta(days=1)
    return days


def usage_chart(rollups: list[dict[str, Any]], period_days: list[str] | None = None) -> Chart:
    """Stacked bars of credits per day by channel; geometry in Decimal (SVG accepts decimal coordinates)."""
    channels = sorted({r["channel"] for r in rollups})
    colours = {c: CHANNEL_COLOURS[i % len(CHANNEL_COLOURS)] for i, c in enumerate(channels)}
    days = sorted(set(period_days or []) | {r["date"] for r in rollups})
    per_day: dict[str, dict[str, Decimal]] = {d: {} for d in days}
    for r in rollups:
        per_day[r["date"]][r["channel"]] = per_day[r["date"]].get(r["channel"], Decimal(0)) + Decimal(r["credits"])
    top = max((sum(v.values(), Decimal(0)) for v in per_day.values()), default=Decimal(0))
    width, height, plot = 640, 240, Decimal(200)
    step = Decimal(width - 40) / max(len(days), 1)
    bars: list[dict[str, Any]] = []
    for i, day in enumerate(days):
        y = Decimal(220)
        for channel in channels:
            value = per_day[day].get(channel)
            if not value:
                continue
            h = (value * plot / top).quantize(Decimal("0.1")) if top else Decimal(0)
            y -= h
            bars.append({"x": (40 + step * i + step / 10).quantize(Decimal("0.1")), "y": y,
                         "w": (step * 8 / 10).quantize(Decimal("0.1")), "h": h, "fill": colours[channel],
                         "label": f"{day} {channel}: {_credits(value)} credits"})
    return Chart(width=width, height=height, bars=bars, legend=list(colours.items()), top=top, days=days)


def agent_rows(per_agent: list[dict[str, Any]], agents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Credits per agent in the window (the API's ``group_by=agent``), named from the agents list; agents without
    usage in it show 0, usage reported without an agent shows as such."""
    names = {a["id"]: a["name"] or a["id"] for a in agents}
    rows = [{"label": names.get(u["agent_id"], u["agent_id"]) if u["agent_id"] else "(no agent)",
             "credits": Decimal(str(u["credits"]))} for u in per_agent]
    used = {u["agent_id"] for u in per_agent}
    return rows + [{"label": names[a["id"]], "credits": Decimal(0)} for a in agents if a["id"] not in used]


def agent_chart(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Horizontal bars of credits per agent in the window, widest first (350 px for the top one; Decimal
    geometry)."""
    spent = [(r["label"], r["credits"]) for r in rows]
    top = max((v for _, v in spent), default=Decimal(0))
    bars = []
    for i, (label, value) in enumerate(sorted(spent, key=lambda x: -x[1])):
        width = (value * 350 / top).quantize(Decimal("0.1")) if top else Decimal(0)
        bars.append({"label": label, "value": value, "w": width, "tx": 176 + width, "y": 24 * i})
    return bars


async def plan(ctx: Ctx) -> Response:
    catalog = ctx.request.app.state.plan_catalog
    current = await ctx.call("GET", "/api/v1/billing/subscription", subscription.get_subscription, pool=ctx.pool,
                             catalog=catalog)
    offered = await ctx.call("GET", "/api/v1/billing/plans", plans.list_plans, catalog=catalog)
    proration = getattr(ctx.request.state, "proration", None)
    preview = getattr(ctx.request.state, "preview", None)
    names = {p["id"]: p["name"] for p in offered["items"]}
    return ctx.render("plan.html", "plan", error=error_of(ctx), current=current, plans=offered["items"],
                      proration=proration, preview=preview, names=names)


async def change_plan(ctx: Ctx) -> Response:
    """An immediate change is shown first (the API's preview: what it would credit and charge, prorated now by the
    change's own function) and made only when the customer confirms; a change at the next renewal prorates nothing
    and is made at once."""
    try:
        req = subscription.SubscriptionRequest(plan_id=_blank_none(ctx.form.get("plan_id")),
                                               effective=ctx.form.get("effective") or "next_renewal")
        if req.effective == "immediately" and ctx.form.get("confirm") != "yes":
            preview = await ctx.call("GET", "/api/v1/billing/subscription/preview",
                                     subscription.preview_subscription, pool=ctx.pool,
                                     catalog=ctx.request.app.state.plan_catalog, plan_id=req.plan_id,
                                     effective="immediately")
            if preview.get("proration"):  # a change of plan (subscribing prorates nothing: no step)
                ctx.request.state.preview = preview
                return await plan(ctx)
        changed = await ctx.call("POST", "/api/v1/billing/subscription", subscription.change_subscription, req,
                                 pool=ctx.pool, catalog=ctx.request.app.state.plan_catalog, request=ctx.request)
    except (CreditflowError, ValidationError) as exc:
        return await fail(ctx, plan, exc)
    if req.effective != "immediately":  # nothing prorated to show: back to the page (a reload sends nothing again)
        return done("plan", "/portal/plan")
    # Shown once, right after the change: what the immediate change credited and charged (the API's answer).
    ctx.request.state.proration = changed.get("proration")
    shown = await plan(ctx)
    return shown


async def buy(ctx: Ctx) -> Response:
    policy = ctx.settings.topup_policy()
    return ctx.render("buy.html", "buy", error=error_of(ctx), packages=policy.packages, cards=await _cards(ctx),
                      min_usd=ctx.settings.topup_min_usd, max_usd=ctx.settings.topup_max_usd,
                      request_id=f"portal-{uuid.uuid4().hex}", form=ctx.form)


async def buy_credits(ctx: Ctx) -> Response:
    """A top-up with a saved card through the API's top-up code; the form's request id makes a resubmission (a
    double click, a reload) join the same top-up instead of charging again."""
    choice = ctx.form.get("package_id", "")
    try:
        req = topups.TopUpRequest(
            package_id=choice if choice and choice != "custom" else None,
            amount_usd=_blank_none(ctx.form.get("amount_usd")) if choice == "custom" else None,
            payment_method_id=ctx.form.get("payment_method_id") or None,
            request_id=ctx.form.get("request_id") or None)
        if req.payment_method_id == NEW_CARD:
            return await _pay_with_a_new_card(ctx, req)
        if req.payment_method_id is None:
            raise CreditflowError("no_payment_method", "choose one of your saved cards or a new card")
        response = await topups.topup(req, principal=ctx.may("POST", "/api/v1/billing/wallet/topup"), pool=ctx.pool,
                                      settings=ctx.settings, request=ctx.request)
    except (CreditflowError, ValidationError) as exc:
        return await fail(ctx, buy, exc)
    return done("topup" if data(response).get("status") == "succeeded" else "topup_pending", "/portal")


NEW_CARD = "new"  # the Buy page's "a new card" choice


async def _pay_with_a_new_card(ctx: Ctx, req: topups.TopUpRequest) -> Response:
    """A new card is entered on the hosted checkout page (Stripe.js; docs/checkout.md), never on a second card form:
    the API's checkout code makes the session (the form's request id is its idempotency key, so a resubmission
    opens the same one), the browser goes there and comes back to the overview, or to this page on cancel."""
    base = public_base_url(ctx.settings, ctx.request).rstrip("/")
    body = checkout_api.CheckoutSessionCreate(package_id=req.package_id, amount_usd=req.amount_usd,
                                              success_url=f"{base}/portal?ok=checkout",
                                              cancel_url=f"{base}/portal/buy", idempotency_key=req.request_id)
    created = await ctx.call("POST", "/api/v1/checkout/sessions", checkout_api.create_checkout_session, body,
                             pool=ctx.pool, settings=ctx.settings, request=ctx.request)
    return RedirectResponse(str(created["url"]), 303, headers=SECURITY_HEADERS)


async def details(ctx: Ctx) -> Response:
    """Invoice address, billing email and tax registrations (the profile printed on invoices)."""
    profile = await ctx.call("GET", "/api/v1/billing/profile", invoices.get_billing_profile, pool=ctx.pool)
    return ctx.render("details.html", "details", error=error_of(ctx), profile=profile)


async def add_tax_registration(ctx: Ctx) -> Response:
    try:
        req = invoices.TaxRegistrationCreate(country=ctx.form.get("tax_country", "").upper(),
                                             description=ctx.form.get("tax_description", ""),
                                             value=ctx.form.get("tax_value", ""))
        await ctx.call("POST", "/api/v1/billing/tax-registrations", invoices.add_tax_registration, req,
                       pool=ctx.pool)
    except (CreditflowError, ValidationError) as exc:
        return await fail(ctx, details, exc)
    return done("tax_added", "/portal/details")


async def delete_tax_registration(ctx: Ctx) -> Response:
    try:
        await ctx.call("DELETE", "/api/v1/billing/tax-registrations/{registration_id}",
                       invoices.delete_tax_registration, ctx.form.get("registration_id", ""), pool=ctx.pool)
    except CreditflowError as exc:
        return await fail(ctx, details, exc)
    return done("tax_deleted", "/portal/details")


ADDRESS_FIELDS = ("company", "address_line1", "address_line2", "city", "postal_code", "region", "country",
                  "po_number")


async def save_address(ctx: Ctx) -> Response:
    try:
        req = invoices.InvoiceAddressUpdate(**{k: ctx.form.get(k, "") or None for k in ADDRESS_FIELDS})
        await ctx.call("PUT", "/api/v1/billing/invoice-address", invoices.put_invoice_address, req, pool=ctx.pool)
    except (CreditflowError, ValidationError) as exc:
        return await fail(ctx, details, exc)
    return done("address", "/portal/details")


async def save_email(ctx: Ctx) -> Response:
    try:
        req = invoices.BillingEmailUpdate(billing_email=ctx.form.get("billing_email", ""))
        await ctx.call("PUT", "/api/v1/billing/billing-email", invoices.put_billing_email, req, pool=ctx.pool)
    except (CreditflowError, ValidationError) as exc:
        return await fail(ctx, details, exc)
    return done("email", "/portal/details")


async def logout(ctx: Ctx) -> Response:
    await sessions.end(ctx.pool, ctx.session.id)
    response = message(ctx.request, 200, "You are signed out", "Your billing session has ended.",
                       ctx.session.return_url)
    response.delete_cookie(COOKIE_NAME, path="/portal", httponly=True, samesite="lax",
                           secure=ctx.request.url.scheme == "https")
    return response


async def stylesheet(request: Request) -> Response:
    return Response(STATIC_CSS.read_bytes(), media_type="text/css",
                    headers={"Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"})


router = APIRouter()
router.include_router(api_router)
router.add_route("/portal/static/portal.css", stylesheet, ["GET"], include_in_schema=False)
router.add_route("/portal/start/{token}", start, ["GET"], include_in_schema=False)
for path, view, methods in [
    ("/portal", overview, ["GET"]), ("/portal/history", history, ["GET"]),
    ("/portal/history.csv", history_csv, ["GET"]), ("/portal/invoices", invoice_list, ["GET"]),
    ("/portal/invoices/pay", pay_invoice, ["POST"]), ("/portal/invoices/{invoice_id}/pdf", invoice_pdf, ["GET"]),
    ("/portal/payment-methods", cards, ["GET"]), ("/portal/payment-methods/default", card_default, ["POST"]),
    ("/portal/payment-methods/delete", card_delete, ["POST"]),
    ("/portal/payment-methods/add", card_add, ["POST"]), ("/portal/agents", agent_list, ["GET"]),
    ("/portal/agents/{action:str}", agent_action, ["POST"]), ("/portal/spend", spend, ["GET"]),
    ("/portal/spend", save_spend, ["POST"]), ("/portal/spend/enabled", toggle_spend, ["POST"]),
    ("/portal/spend/notifications", save_notifications, ["POST"]),
    ("/portal/spend/alerts", save_alerts, ["POST"]), ("/portal/spend/channels", save_channels, ["POST"]),
    ("/portal/auto-recharge", recharge, ["GET"]),
    ("/portal/auto-recharge", save_recharge, ["POST"]), ("/portal/usage", usage, ["GET"]),
    ("/portal/plan", plan, ["GET"]), ("/portal/plan", change_plan, ["POST"]), ("/portal/buy", buy, ["GET"]),
    ("/portal/buy", buy_credits, ["POST"]), ("/portal/details", details, ["GET"]),
    ("/portal/details/address", save_address, ["POST"]),
    ("/portal/details/tax-registrations", add_tax_registration, ["POST"]),
    ("/portal/details/tax-registrations/delete", delete_tax_registration, ["POST"]),
    ("/portal/details/email", save_email, ["POST"]),
    ("/portal/logout", logout, ["POST"]),
]:
    router.add_route(path, page(view), methods, include_in_schema=False)
