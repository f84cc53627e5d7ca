"""The FastAPI application: routers, error format, lifespan (pool)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from creditflow import __version__
from creditflow.api import accounts, auto_recharge, billing, features, payment_methods, refunds, stripe_webhooks, topups
from creditflow.api.agents import router as agents_router
from creditflow.api.alerts import router as alerts_router
from creditflow.api.autumn import router as autumn_router
from creditflow.api.checkout import router as checkout_router
from creditflow.api.conventions import VersionMiddleware
from creditflow.api.credit_systems import router as credit_systems_router
from creditflow.api.entitlements import router as entitlements_router
from creditflow.api.error_handling import InputGuardMiddleware, UnexpectedErrorMiddleware, install_error_handlers
from creditflow.api.exact_json import ExactJSONResponse
from creditflow.api.invoices import router as invoices_router
from creditflow.api.keys import KeyCache
from creditflow.api.limits import router as limits_router
from creditflow.api.notification_channels import router as notification_channels_router
from creditflow.api.openapi import install_openapi
from creditflow.api.operator import router as operator_router
from creditflow.api.organizations import router as organizations_router
from creditflow.api.plans import router as plans_router
from creditflow.api.reconciliation import router as reconciliation_router
from creditflow.api.request_context import RequestIdMiddleware
from creditflow.api.subscription import router as subscription_router
from creditflow.api.verify import router as verify_router
from creditflow.api.webhooks import router as webhooks_router
from creditflow.config import Settings
from creditflow.ledger import metering
from creditflow.ledger.db import open_pool
from creditflow.ledger.plan_pricing import sync_plan_rates
from creditflow.observability import health, tracing
from creditflow.observability.asgi import AccessLogMiddleware
from creditflow.observability.logs import log_startup
from creditflow.payments.gateway import StripeGateway
from creditflow.web.checkout import router as checkout_page_router
from creditflow.web.portal import router as portal_router

DESCRIPTION = """
Prepaid credit wallet, metering and billing. **1 credit = 1 US cent.**

* Authenticate with `Authorization: Bearer <API key>`. Account keys carry scopes (`billing:read`,
  `usage:write`, `billing:write`, `payments:write`, `wallet:credit`: docs/scopes.md) and act on their own
  account; organization keys act on their organization's workspaces; admin keys act on any account and
  name it (`account_id` in the body or query).
* **Amounts are exact JSON numbers**: whole credits as integers (`45230`), sub-credit amounts with
  their exact decimal digits (`0.5`). Requests may send numbers or decimal strings (`"2.5"`).
* Errors: `{"error": {"code": "<stable machine-readable code>", "type": "<family>", "message": "...",
  "param": "<field or null>", "details": {}, "request_id": "req_..."}}`; a 503 carries `Retry-After`
  (see docs/api.md).
"""


def app_from_environment() -> FastAPI:
    """The app of one process of ``creditflow api --workers N`` (uvicorn's factory): settings and logging from
    the environment, as the parent process read them."""
    from creditflow.config import get_settings
    from creditflow.observability.logs import configure_logging

    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)
    return create_app(settings)


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool = open_pool(settings.database_url, settings.db_pool_min_size, settings.db_pool_max_size)
        await pool.open()
        metering.configure_track(pool, writers=settings.track_writers)
        app.state.pool = pool
        await sync_plan_rates(pool, app.state.plan_catalog)  # the hot path prices plan accounts from plan_rates
        # Temporal (top-ups): connected on first use, so the rest of the API works while it is down.
        app.state.temporal = topups.TemporalConnector(settings)
        log_startup("api", settings)
        try:
            yield
        finally:
            await pool.close()

    app = FastAPI(title="creditflow", version=__version__, description=DESCRIPTION, lifespan=lifespan,
                  default_response_class=ExactJSONResponse,
                  telemetry=tracing.fastapi_telemetry(settings))  # type: ignore[arg-type]  # off: none at all
    app.state.settings = settings
    app.state.key_cache = KeyCache(settings.api_key_cache_seconds)  # per process: docs/scopes.md#key-lookups
    app.add_middleware(UnexpectedErrorMiddleware)  # inside RequestIdMiddleware: its answers carry the request id
    app.add_middleware(InputGuardMiddleware)
    app.add_middleware(VersionMiddleware)
    tracing.install_middleware(app, settings)  # off unless CREDITFLOW_OTEL_TRACES: ids on the request span
    app.add_middleware(AccessLogMiddleware)  # inside the request id: its lines and metrics carry it
    app.add_middleware(RequestIdMiddleware)
    app.state.gateway = StripeGateway.from_settings(settings)
    app.state.plan_catalog = settings.plan_catalog()  # validated now: a bad catalog file stops start-up

    install_error_handlers(app)
    install_openapi(app)

    # Metering first: a request is matched against the routes in this order (FastAPI tries each included router's
    # routes in turn: ~130-300 us per request with metering third), and track/check/batch are the hot path.
    app.include_router(billing.router)
    app.include_router(health.router)  # /healthz, /readyz, /metrics
    app.include_router(accounts.router)
    app.include_router(features.router)
    app.include_router(payment_methods.router)
    app.include_router(topups.router)
    app.include_router(auto_recharge.router)
    app.include_router(limits_router)
    app.include_router(agents_router)
    app.include_router(entitlements_router)
    app.include_router(autumn_router)  # Autumn SDK drop-in (docs/autumn-compatibility.md)
    app.include_router(subscription_router)
    app.include_router(refunds.router)
    app.include_router(stripe_webhooks.router)
    app.include_router(notification_channels_router)
    app.include_router(alerts_router)
    app.include_router(plans_router)
    app.include_router(invoices_router)
    app.include_router(verify_router)
    app.include_router(reconciliation_router)
    app.include_router(organizations_router)
    app.include_router(credit_systems_router)  # named credit systems (docs/credit-systems.md)
    app.include_router(operator_router)  # the operator CLI's answers for an admin key (no database URL needed)
    app.include_router(checkout_router)  # packages and checkout sessions (docs/checkout.md)
    app.include_router(checkout_page_router)  # the hosted checkout page, /checkout/{id}
    app.include_router(portal_router)  # the customer billing portal: /portal pages, POST /api/v1/portal/sessions
    app.include_router(webhooks_router)  # webhook deliveries and redelivery (docs/api.md)
    return app
