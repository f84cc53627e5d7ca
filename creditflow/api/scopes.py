"""Which API key scope each route requires: the one table the API enforces (``deps.require``).

Why one table: scopes separate reading, metering, settings and money (seed 004's scope table; seed 000 lets keys
configure auto-recharge), so a key given ``usage:write`` alone must never reach a route that charges a card. A
table that lists every route is reviewable at a glance, and ``tests/test_scopes.py`` fails when a route is added
without an entry here (or when an entry names a route that no longer exists).

Values are the scopes that admit a call (any one of them); admin keys pass every route. A route missing from
the table is admin-only (fail closed). See docs/scopes.md.
"""

from __future__ import annotations

from creditflow.api.keys import Scope

READ = frozenset({Scope.BILLING_READ})
USAGE = frozenset({Scope.USAGE_WRITE})
# A check writes nothing: keys that read (what they could do before scopes were split) and metering keys.
CHECK = frozenset({Scope.BILLING_READ, Scope.USAGE_WRITE})
SETTINGS = frozenset({Scope.BILLING_WRITE})
PAYMENTS = frozenset({Scope.PAYMENTS_WRITE})
CREDIT = frozenset({Scope.WALLET_CREDIT})
TRANSFERS = frozenset({Scope.TRANSFERS_WRITE})
ADMIN = frozenset({Scope.ADMIN})

# Routes anyone may call: liveness and readiness, metrics, Stripe's signed webhooks (verified by signature).
PUBLIC_ROUTES: frozenset[tuple[str, str]] = frozenset({
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("POST", "/api/v1/stripe/webhook"),
    # The hosted checkout page (docs/checkout.md): the unguessable session id is the capability, its POSTs also
    # carry the session's CSRF token.
    ("GET", "/checkout/{session_id}"),
    ("POST", "/checkout/{session_id}/intent"),
    ("POST", "/checkout/{session_id}/pay"),
    ("GET", "/checkout/static/checkout.js"),
    ("GET", "/checkout/static/checkout.css"),
})

B = "/api/v1/billing"

ROUTE_SCOPES: dict[tuple[str, str], frozenset[Scope]] = {
    # Accounts and keys (the platform's).
    ("POST", "/api/v1/accounts"): ADMIN,
    ("GET", "/api/v1/accounts"): ADMIN,
    ("GET", "/api/v1/accounts/{account_id}"): READ,
    ("POST", "/api/v1/accounts/{account_id}/api-keys"): ADMIN,
    ("GET", "/api/v1/accounts/{account_id}/api-keys"): ADMIN,
    ("DELETE", "/api/v1/accounts/{account_id}/api-keys/{key_id}"): ADMIN,
    ("GET", "/api/v1/features"): READ,
    ("PUT", "/api/v1/features/{feature_id}"): ADMIN,
    ("GET", "/api/v1/credit-systems"): READ,
    ("POST", "/api/v1/credit-systems"): ADMIN,
    ("GET", "/api/v1/credit-systems/{credit_system_id}"): READ,
    # Metering: track, check, holds, events.
    ("POST", f"{B}/track"): USAGE,
    ("POST", f"{B}/track/batch"): USAGE,
    ("POST", f"{B}/check"): CHECK,
    ("POST", "/api/v1/entitled"): CHECK,
    ("POST", "/api/v1/event"): USAGE,
    # Autumn SDK drop-in (creditflow/api/autumn.py): creating a customer creates an account (admin); a check with
    # send_event also needs usage:write (checked in the handler).
    ("POST", "/api/v1/customers"): ADMIN,
    ("GET", "/api/v1/customers/{customer_id}"): READ,
    ("POST", "/api/v1/check"): CHECK,
    ("POST", "/api/v1/track"): USAGE,
    ("POST", f"{B}/holds"): USAGE,
    ("POST", f"{B}/holds/{{hold_id}}/settle"): USAGE,
    ("POST", f"{B}/holds/{{hold_id}}/release"): USAGE,
    # Reading.
    ("GET", f"{B}/balance"): READ,
    ("GET", f"{B}/wallet"): READ,
    ("GET", f"{B}/transactions"): READ,
    ("GET", f"{B}/usage/items"): READ,
    ("GET", f"{B}/usage"): READ,
    ("GET", f"{B}/payment-methods"): READ,
    ("GET", f"{B}/wallet/topups"): READ,
    ("GET", f"{B}/auto-recharge"): READ,
    ("GET", f"{B}/wallet/auto-reload"): READ,
    ("GET", f"{B}/limits"): READ,
    ("GET", f"{B}/spend"): READ,
    ("GET", "/api/v1/agents"): READ,
    ("GET", "/api/v1/agents/{agent_id}"): READ,
    ("GET", "/api/v1/agents/{agent_id}/events"): READ,
    ("GET", f"{B}/subscription"): READ,
    ("GET", f"{B}/subscription/preview"): READ,
    ("GET", f"{B}/recurring-charges"): READ,
    ("GET", f"{B}/refunds"): READ,
    ("GET", f"{B}/notification-channels"): READ,
    ("GET", f"{B}/alerts"): READ,
    ("GET", "/api/v1/webhooks/deliveries"): READ,
    ("GET", f"{B}/plans"): READ,
    ("GET", f"{B}/profile"): READ,
    ("GET", f"{B}/invoice-address"): READ,
    ("GET", f"{B}/billing-email"): READ,
    ("GET", f"{B}/tax-registrations"): READ,
    ("GET", f"{B}/invoices"): READ,
    ("GET", f"{B}/invoices/{{invoice_id}}"): READ,
    ("GET", f"{B}/invoices/{{invoice_id}}/pdf"): READ,
    # Settings that charge nothing: limits, alerts, channels, agents, address, tax ids.
    ("PUT", f"{B}/limits"): SETTINGS,
    ("POST", f"{B}/limits"): SETTINGS,
    ("PUT", f"{B}/alerts"): SETTINGS,
    ("POST", f"{B}/alerts"): SETTINGS,
    ("PUT", f"{B}/notification-channels"): SETTINGS,
    # Sending a webhook event again moves no money: a settings-level write.
    ("POST", "/api/v1/webhooks/deliveries/{delivery_id}/redeliver"): SETTINGS,
    ("POST", "/api/v1/agents"): SETTINGS,
    ("PATCH", "/api/v1/agents/{agent_id}"): SETTINGS,
    ("POST", "/api/v1/agents/{agent_id}/pause"): SETTINGS,
    ("POST", "/api/v1/agents/{agent_id}/resume"): SETTINGS,
    ("PUT", f"{B}/invoice-address"): SETTINGS,
    ("PUT", f"{B}/billing-email"): SETTINGS,
    ("POST", f"{B}/tax-registrations"): SETTINGS,
    ("DELETE", f"{B}/tax-registrations/{{registration_id}}"): SETTINGS,
    # Packages and hosted checkout links (docs/checkout.md): creating a link charges nothing (the buyer pays on the
    # page), so it is a setting.
    ("GET", f"{B}/packages"): READ,
    ("POST", "/api/v1/checkout/sessions"): SETTINGS,
    ("POST", f"{B}/checkout"): SETTINGS,
    ("GET", "/api/v1/checkout/sessions/{session_id}"): READ,
    # Money: charging a saved card (top-up, auto-recharge, plan change), the cards themselves (a card added or
    # made default is what the next charge uses), refunds of purchases.
    ("POST", f"{B}/wallet/topup"): PAYMENTS,
    ("PUT", f"{B}/auto-recharge"): PAYMENTS,
    ("POST", f"{B}/auto-recharge"): PAYMENTS,
    ("PUT", f"{B}/wallet/auto-reload"): PAYMENTS,
    ("POST", f"{B}/subscription"): PAYMENTS,
    ("POST", f"{B}/refunds"): PAYMENTS,
    ("POST", f"{B}/payment-methods"): PAYMENTS,
    ("POST", f"{B}/payment-methods/{{payment_method_id}}/default"): PAYMENTS,
    ("DELETE", f"{B}/payment-methods/{{payment_method_id}}"): PAYMENTS,
    # Manual credits: the platform's (a key gets it only when the platform asks for it).
    ("POST", f"{B}/wallet/credit"): CREDIT,
    # Platform operations.
    ("POST", f"{B}/recurring-charges"): ADMIN,
    ("DELETE", f"{B}/recurring-charges/{{charge_id}}"): ADMIN,
    ("PATCH", f"{B}/tax-registrations/{{registration_id}}"): ADMIN,
    ("GET", "/api/v1/verify"): ADMIN,
    ("POST", "/api/v1/reconciliation/runs"): ADMIN,
    ("GET", "/api/v1/reconciliation/runs"): ADMIN,
    ("GET", "/api/v1/reconciliation/runs/{run_id}"): ADMIN,
    # Organizations (workspaces) and transfers between their workspaces (docs/organizations-and-transfers.md).
    ("POST", "/api/v1/organizations"): ADMIN,
    ("GET", "/api/v1/organizations/{organization_id}"): READ,
    ("POST", "/api/v1/organizations/{organization_id}/accounts"): ADMIN,
    ("POST", "/api/v1/organizations/{organization_id}/api-keys"): ADMIN,
    ("GET", "/api/v1/organizations/{organization_id}/api-keys"): ADMIN,
    ("DELETE", "/api/v1/organizations/{organization_id}/api-keys/{key_id}"): ADMIN,
    ("POST", "/api/v1/organizations/{organization_id}/transfers"): TRANSFERS,
    ("GET", "/api/v1/organizations/{organization_id}/transfers"): READ,
    # The customer portal (docs/portal.md): the platform opens a session for its customer. The portal's pages
    # (/portal/*) are not API routes: the session cookie authenticates them, and each reuses an API route's
    # handler only when this table admits PORTAL_SESSION_SCOPES to that route (creditflow/web/portal.py).
    ("POST", "/api/v1/portal/sessions"): ADMIN,
}

# Routes added beside the main table (invoice payment; the operator API for the CLI without database access),
# declared here so they have their scope the moment they are merged. Fold them into the table above after the merge
# (tests/test_scopes.py does not require them to exist until then).
PENDING_ROUTES: dict[tuple[str, str], frozenset[Scope]] = {
    ("POST", f"{B}/invoices/{{invoice_id}}/pay"): PAYMENTS,
    ("GET", "/api/v1/operator/accounts/{account_id}/agents"): ADMIN,
    ("GET", "/api/v1/operator/accounts/{account_id}/agents/{agent_id}/events"): ADMIN,
    ("GET", "/api/v1/operator/accounts/{account_id}/charges"): ADMIN,
    ("GET", "/api/v1/operator/accounts/{account_id}/transactions"): ADMIN,
    ("GET", "/api/v1/operator/transactions/{txn}"): ADMIN,
    ("GET", "/api/v1/operator/payment-events/failed"): ADMIN,
    ("POST", "/api/v1/operator/payment-events/{failure_id}/redrive"): ADMIN,
}
ROUTE_SCOPES.update({route: scopes for route, scopes in PENDING_ROUTES.items() if route not in ROUTE_SCOPES})

# Scopes a key holding one scope also holds (billing:write could always read).
IMPLIED: dict[Scope, frozenset[Scope]] = {Scope.BILLING_WRITE: frozenset({Scope.BILLING_READ})}

# What a key used to mean, and what migration 0031_1 gave each stored key so it keeps what it could do.
LEGACY_EXPANSION: dict[Scope, frozenset[Scope]] = {
    Scope.BILLING_WRITE: frozenset({Scope.BILLING_READ, Scope.BILLING_WRITE, Scope.USAGE_WRITE,
                                    Scope.PAYMENTS_WRITE}),
}

# Scopes an account key may be issued with; organization keys take ORGANIZATION_KEY_SCOPES.
ACCOUNT_KEY_SCOPES = frozenset({Scope.BILLING_READ, Scope.USAGE_WRITE, Scope.BILLING_WRITE, Scope.PAYMENTS_WRITE,
                                Scope.WALLET_CREDIT})
ORGANIZATION_KEY_SCOPES = frozenset({Scope.BILLING_READ, Scope.TRANSFERS_WRITE})
# A portal ("dashboard") session: read, settings and payments, never metering or manual credits.
PORTAL_SESSION_SCOPES = frozenset({Scope.BILLING_READ, Scope.BILLING_WRITE, Scope.PAYMENTS_WRITE})


def granted(scopes: frozenset[str]) -> frozenset[str]:
    """A key's scopes with the ones they imply."""
    out = set(scopes)
    for scope, implied in IMPLIED.items():
        if scope in scopes:
            out.update(implied)
    return frozenset(out)


def required_scopes(method: str, path: str) -> frozenset[Scope]:
    """The scopes that admit ``method path`` (a route's path template); admin-only when the table lacks it."""
    return ROUTE_SCOPES.get((method, path), ADMIN)
