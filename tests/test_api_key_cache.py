"""API keys resolved once per process for a few seconds (``api_key_cache_seconds``), revocation honoured.

``KeyCache.lookups`` counts the database queries that resolve a secret; the tests read it through the app."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI

from creditflow.api.app import create_app
from creditflow.api.keys import KeyCache, Principal, hash_secret
from creditflow.config import Settings
from tests.conftest import ADMIN_KEY
from tests.support.api import bearer, key_for, new_account

BALANCE = "/api/v1/billing/balance"


async def serve(settings: Settings, ttl: float) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    app = create_app(settings.model_copy(update={"api_key_cache_seconds": ttl}))
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://creditflow.test",
            headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as client:
        yield app, client


@pytest.fixture
async def cached(settings: Settings) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    async for pair in serve(settings, 60):
        yield pair


def lookups(app: FastAPI) -> int:
    return app.state.key_cache.lookups


async def test_a_repeated_key_is_not_queried_again(cached: tuple[FastAPI, httpx.AsyncClient]) -> None:
    app, api = cached
    account = await new_account(api)
    secret = await key_for(api, account, "billing:read")
    assert lookups(app) == 0  # the admin key is compared with the setting, never looked up
    for _ in range(3):
        assert (await api.get(BALANCE, headers=bearer(secret))).status_code == 200
    assert lookups(app) == 1
    assert hash_secret(secret) in app.state.key_cache._entries and secret not in app.state.key_cache._entries


async def test_a_key_revoked_here_is_refused_at_once(cached: tuple[FastAPI, httpx.AsyncClient]) -> None:
    app, api = cached
    account = await new_account(api)
    secret = await key_for(api, account, "billing:read")
    assert (await api.get(BALANCE, headers=bearer(secret))).status_code == 200
    key_id = (await api.get(f"/api/v1/accounts/{account}/api-keys")).json()["items"][0]["id"]
    assert (await api.delete(f"/api/v1/accounts/{account}/api-keys/{key_id}")).status_code == 200
    refused = await api.get(BALANCE, headers=bearer(secret))
    assert (refused.status_code, refused.json()["error"]["code"]) == (401, "unauthorized")
    assert lookups(app) == 2


async def test_an_organization_key_revoked_here_is_refused_at_once(cached: tuple[FastAPI, httpx.AsyncClient]) -> None:
    app, api = cached
    org = (await api.post("/api/v1/organizations", json={"name": "Org"})).json()["id"]
    account = await new_account(api)
    assert (await api.post(f"/api/v1/organizations/{org}/accounts", json={"account_id": account})).status_code == 200
    created = (await api.post(f"/api/v1/organizations/{org}/api-keys", json={"scopes": ["billing:read"]})).json()
    read = {"account_id": account}
    assert (await api.get(BALANCE, params=read, headers=bearer(created["secret"]))).status_code == 200
    # A workspace attached later is usable at once: attaching evicts the organization's keys.
    later = await new_account(api)
    assert (await api.post(f"/api/v1/organizations/{org}/accounts", json={"account_id": later})).status_code == 200
    assert (await api.get(BALANCE, params={"account_id": later}, headers=bearer(created["secret"]))).status_code == 200
    assert lookups(app) == 2
    assert (await api.delete(f"/api/v1/organizations/{org}/api-keys/{created['id']}")).status_code == 200
    assert (await api.get(BALANCE, params=read, headers=bearer(created["secret"]))).status_code == 401


async def test_another_process_revocation_is_seen_within_the_ttl(settings: Settings) -> None:
    """Two apps (two processes' caches) on one database: a revoke through one is seen by the other once its
    entry expires (the TTL is the bound). The expiry is forced by back-dating the entry, not by sleeping."""
    async for _, admin in serve(settings, 60):
        account = await new_account(admin)
        secret = await key_for(admin, account, "billing:read")
        key_id = (await admin.get(f"/api/v1/accounts/{account}/api-keys")).json()["items"][0]["id"]
        async for other_app, other in serve(settings, 0.3):
            assert (await other.get(BALANCE, headers=bearer(secret))).status_code == 200
            assert (await admin.delete(f"/api/v1/accounts/{account}/api-keys/{key_id}")).status_code == 200
            assert (await other.get(BALANCE, headers=bearer(secret))).status_code == 200  # within the TTL
            cache: KeyCache = other_app.state.key_cache
            for secret_hash, (_, principal) in list(cache._entries.items()):  # the TTL elapses
                cache._entries[secret_hash] = (0.0, principal)
            assert (await other.get(BALANCE, headers=bearer(secret))).status_code == 401
            assert lookups(other_app) == 2


async def test_ttl_zero_queries_every_request(settings: Settings) -> None:
    async for app, api in serve(settings, 0):
        account = await new_account(api)
        secret = await key_for(api, account, "billing:read")
        for _ in range(3):
            assert (await api.get(BALANCE, headers=bearer(secret))).status_code == 200
        assert lookups(app) == 3
        assert len(app.state.key_cache) == 0


async def test_an_unknown_key_is_not_cached(cached: tuple[FastAPI, httpx.AsyncClient]) -> None:
    app, api = cached
    for _ in range(2):
        resp = await api.get(BALANCE, headers=bearer("cf_sk_not-a-real-key"))
        assert (resp.status_code, resp.json()["error"]["code"]) == (401, "unauthorized")
    assert lookups(app) == 2 and len(app.state.key_cache) == 0  # no negative caching: a later key works at once


def test_the_cache_is_bounded_and_a_lookup_racing_an_eviction_is_not_stored() -> None:
    cache = KeyCache(60, max_size=2)
    principals = [Principal(key_id=f"key_{i}", account_id="acc_x", scopes=frozenset()) for i in range(3)]
    for i, principal in enumerate(principals):
        cache.put(f"h{i}", principal, cache.generation)
    assert (len(cache), cache.get("h0"), cache.get("h2")) == (2, None, principals[2])
    generation = cache.generation  # a lookup starts, the key is revoked meanwhile, the lookup ends
    cache.evict_key("key_9")
    cache.put("h9", Principal(key_id="key_9", account_id="acc_x", scopes=frozenset()), generation)
    assert cache.get("h9") is None
