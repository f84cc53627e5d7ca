"""One error type with a stable machine-readable code, shared by the ledger, API and CLI."""

from __future__ import annotations

# HTTP status for each code the API can return. Unknown codes map to 400.
STATUS_BY_CODE: dict[str, int] = {
    "unauthorized": 401,
    "forbidden": 403,
    "insufficient_scope": 403,
    # Organizations and transfers between their workspaces.
    "unknown_organization": 404,
    "organization_exists": 409,
    "account_in_other_organization": 409,
    "destination_in_overage": 409,
    "not_found": 404,
    "unknown_account": 404,
    "unknown_feature": 404,
    "unknown_credit_system": 404,
    "credit_system_exists": 409,
    "credit_system_fixed": 409,
    "unknown_hold": 404,
    "unknown_api_key": 404,
    "account_exists": 409,
    "idempotency_conflict": 409,
    "retry_without_idempotency_key": 409,  # the Autumn SDK's own retry of a keyless usage event
    "hold_released": 409,
    "hold_settled": 409,
    "insufficient_credits": 402,
    # Spend control: a paused agent, a limit reached (retry after the period turns or the limit is raised).
    "agent_paused": 403,
    "daily_limit_reached": 429,
    "monthly_limit_reached": 429,
    "agent_limit_reached": 429,
    # Plan credits spent and the agent set to ``stop``: like insufficient_credits, more credits are what it takes
    # (the next cycle's plan credits, or the agent switched to use_balance), not a retry later or a permission.
    "plan_credits_exhausted": 402,
    "invalid_transition": 409,
    "unknown_agent": 404,
    "agent_exists": 409,
    "no_subscription": 409,
    "validation_error": 422,
    "invalid_amount": 422,
    "invalid_quantity": 422,
    "invalid_rate": 422,
    "invalid_id": 422,
    "feature_not_priced": 422,
    "amount_too_large": 422,
    "amount_out_of_range": 422,
    "unknown_package": 422,
    "workflow_unavailable": 503,
    # Payments (Stripe).
    "unknown_payment_method": 404,
    "card_declined": 402,
    "no_payment_method": 402,
    "authentication_required": 402,
    "invoice_not_payable": 409,
    "payment_method_invalid": 422,
    "payment_request_invalid": 422,
    "payment_provider_error": 502,
    "payment_provider_unavailable": 503,
    "payment_provider_not_configured": 503,
    # Hosted checkout (docs/checkout.md): another account's session is unknown too; an expired link is gone.
    "unknown_checkout_session": 404,
    "checkout_session_expired": 410,
    "checkout_session_complete": 409,
    "checkout_payment_canceled": 409,
    "csrf_token_invalid": 403,
    # Refunds.
    "unknown_purchase": 404,
    "not_refundable": 422,
    "refund_window_expired": 422,
    "refund_exceeds_remaining": 422,
    "refund_failed": 502,
    # Invoices and the billing profile (another account's invoice or registration is unknown too).
    "unknown_invoice": 404,
    "unknown_tax_registration": 404,
    "unknown_plan": 422,
    # Stripe webhooks: Stripe retries any non-2xx answer.
    "webhook_signature_missing": 400,
    "webhook_signature_invalid": 400,
    "webhook_payload_invalid": 400,
    "webhook_not_configured": 503,
    "webhook_in_progress": 503,
    # Bad request bodies and the catch-all (creditflow/api/error_handling.py).
    "request_too_large": 413,
    "idempotency_key_mismatch": 400,
    "unsupported_version": 400,
    "database_unavailable": 503,
    "service_unavailable": 503,
    "internal_error": 500,
}

# ``type`` of the error object: the family a client branches on (Stripe's idea), ``code`` the exact reason.
USAGE_DENIALS = frozenset({"insufficient_credits", "agent_paused", "daily_limit_reached", "monthly_limit_reached",
                           "agent_limit_reached", "plan_credits_exhausted"})
TYPE_BY_CODE: dict[str, str] = {
    "idempotency_conflict": "idempotency_error",
    "idempotency_key_mismatch": "idempotency_error",
    "retry_without_idempotency_key": "idempotency_error",
    "card_declined": "card_error",
    "payment_method_invalid": "card_error",
    **{code: "usage_denied" for code in USAGE_DENIALS},
}
ERROR_TYPES = ("invalid_request_error", "authentication_error", "permission_error", "usage_denied", "card_error",
               "idempotency_error", "api_error")


def error_type(code: str, status: int) -> str:
    """The ``type`` of an error: ``api_error`` for 5xx (retry later), else the code's family."""
    if status >= 500:
        return "api_error"
    if code in TYPE_BY_CODE:
        return TYPE_BY_CODE[code]
    return {401: "authentication_error", 403: "permission_error"}.get(status, "invalid_request_error")


class CreditflowError(Exception):
    """A refusal with a stable ``code`` (e.g. ``insufficient_credits``) and a human message."""

    def __init__(self, code: str, message: str | None = None, *, status: int | None = None,
                 details: dict[str, object] | None = None, param: str | None = None) -> None:
        super().__init__(message or code.replace("_", " "))
        self.code = code
        self.message = message or code.replace("_", " ")
        self.status = status or STATUS_BY_CODE.get(code, 400)
        self.details = details or {}
        self.param = param  # the request field at fault, when one is
