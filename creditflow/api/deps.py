"""Request dependencies: the pool, the calling principal, and which account a call acts on."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from psycopg_pool import AsyncConnectionPool

from creditflow.api.keys import KeyCache, Principal, Scope, authenticate
from creditflow.api.scopes import granted, required_scopes
from creditflow.config import Settings
from creditflow.errors import CreditflowError
from creditflow.ids import check_id
from creditflow.observability.logs import bind
from creditflow.payments.gateway import StripeGateway

bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer cf_sk_...`")


# The app-state dependencies are ``async def`` although they do no I/O: FastAPI runs a plain ``def`` dependency in
# its thread pool, a thread hop (and a GIL hand-over) per dependency per request on the hot path.
async def get_pool(request: Request) -> AsyncConnectionPool:
    return request.app.state.pool


async def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_key_cache(request: Request) -> KeyCache:
    """This process's resolved API keys (routes that revoke a key or change an organization evict from it)."""
    return request.app.state.key_cache


async def get_gateway(request: Request) -> StripeGateway:
    return request.app.state.gateway


async def get_principal(request: Request,
                        credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Principal:
    if credentials is None or not credentials.credentials:
        raise CreditflowError("unauthorized", "missing bearer API key")
    return await principal_of(request, credentials.credentials)


async def principal_of(request: Request, secret: str) -> Principal:
    """Who a bearer secret is (the admin key, or a key from the cache or the database); unknown keys raise."""
    settings = request.app.state.settings
    admin = settings.admin_api_key.get_secret_value() if settings.admin_api_key else None
    return await authenticate(request.app.state.pool, secret, admin, request.app.state.key_cache)


def check_scope(principal: Principal, method: str, path: str) -> None:
    """Refuse (``insufficient_scope``) a key without a scope the route table requires for ``method path`` (the
    route's path template); admin keys pass."""
    if principal.is_admin:
        return
    needed = required_scopes("GET" if method == "HEAD" else method, path)
    if Scope.ADMIN in needed or not needed & granted(principal.scopes):
        names = " or ".join(sorted(s.value for s in needed))
        raise CreditflowError("insufficient_scope", f"this API key lacks the {names} scope",
                              details={"required_scopes": sorted(s.value for s in needed)})


def require(scope: Scope) -> Callable[..., Coroutine[Any, Any, Principal]]:
    """A dependency that admits admin keys and keys holding a scope the route table requires.

    The table (``creditflow.api.scopes.ROUTE_SCOPES``) decides, not ``scope``: ``scope`` documents the route at its
    definition, and tests/test_scopes.py checks that it is one of the table's. A route missing from the table is
    admin-only (fail closed)."""

    async def dependency(request: Request, principal: Principal = Depends(get_principal)) -> Principal:
        check_scope(principal, request.method, getattr(request.scope.get("route"), "path_format", request.url.path))
        return principal

    dependency.declared_scope = scope  # type: ignore[attr-defined]  # read by tests/test_scopes.py
    return dependency


def target_account(principal: Principal, account_id: str | None) -> str:
    """The account a call acts on: an account key's own, one of an organization key's workspaces (named), or the
    one an admin key names.

    An account key naming another account, or an organization key naming an account outside its organization,
    is refused (tenants never see each other)."""
    if principal.is_admin:
        if not account_id:
            raise CreditflowError("validation_error", "admin keys must name the account (account_id)",
                                  param="account_id")
        account = check_id(account_id, "acc", "account_id")
        bind(account_id=account)  # the access log line names the account
        return account
    if principal.organization_id is not None:
        if not account_id:
            raise CreditflowError("validation_error", "organization keys must name the workspace (account_id)",
                                  param="account_id")
        if account_id not in principal.organization_accounts:
            raise CreditflowError("forbidden", "this account is not a workspace of this API key's organization",
                                  param="account_id")
        bind(account_id=account_id)
        return account_id
    assert principal.account_id is not None
    if account_id is not None and account_id != principal.account_id:
        raise CreditflowError("forbidden", "this API key belongs to another account", param="account_id")
    bind(account_id=principal.account_id)
    return principal.account_id
