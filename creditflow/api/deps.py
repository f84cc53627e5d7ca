"""Request dependencies: the pool, the calling principal, and which account a call acts on."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from psycopg_pool import AsyncConnectionPool

from creditflow.api.keys import Principal, Scope, authenticate
from creditflow.config import Settings
from creditflow.errors import CreditflowError
from creditflow.ids import check_id
from creditflow.payments.gateway import StripeGateway

bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer cf_sk_...`")


def get_pool(request: Request) -> AsyncConnectionPool:
    return request.app.state.pool


def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_gateway(request: Request) -> StripeGateway:
    return request.app.state.gateway


async def get_principal(request: Request,
                        credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Principal:
    if credentials is None or not credentials.credentials:
        raise CreditflowError("unauthorized", "missing bearer API key")
    settings = request.app.state.settings
    admin = settings.admin_api_key.get_secret_value() if settings.admin_api_key else None
    return await authenticate(request.app.state.pool, credentials.credentials, admin)


def require(scope: Scope) -> Callable[..., Coroutine[Any, Any, Principal]]:
    """A dependency that admits admin keys and account keys holding ``scope``.

    ``billing:write`` implies ``billing:read``."""

    async def dependency(principal: Principal = Depends(get_principal)) -> Principal:
        if principal.is_admin:
            return principal
        granted = set(principal.scopes)
        if Scope.BILLING_WRITE in granted:
            granted.add(Scope.BILLING_READ)
        if scope == Scope.ADMIN or scope not in granted:
            raise CreditflowError("insufficient_scope", f"this API key lacks the {scope.value} scope")
        return principal

    return dependency


def target_account(principal: Principal, account_id: str | None) -> str:
    """The account a call acts on: an account key's own, or the one an admin key names.

    An account key naming another account is refused (tenants never see each other)."""
    if principal.is_admin:
        if not account_id:
            raise CreditflowError("validation_error", "admin keys must name the account (account_id)",
                                  param="account_id")
        return check_id(account_id, "acc", "account_id")
    assert principal.account_id is not None
    if account_id is not None and account_id != principal.account_id:
        raise CreditflowError("forbidden", "this API key belongs to another account", param="account_id")
    return principal.account_id
