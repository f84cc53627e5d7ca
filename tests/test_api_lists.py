"""Admin account listing, search and lookup by external id; cursor pagination on every list (issue 12)."""

from __future__ import annotations

import uuid

import httpx

from tests.test_api_hardening import assert_error
from tests.test_api_metering import new_account


async def test_accounts_list_search_page_and_lookup_by_external_id(api: httpx.AsyncClient) -> None:
    tag = uuid.uuid4().hex[:10]
    ids = [await new_account(api, name=f"Acme {tag} {i}", external_id=f"ext-{tag}-{i}") for i in range(5)]
    other = await new_account(api, name="Globex", billing_email=f"ap-{tag}@globex.test")
    path = "/api/v1/accounts"
    everything = (await api.get(path, params={"q": f"acme {tag}"})).json()
    assert [a["id"] for a in everything["items"]] == ids[::-1] and everything["has_more"] is False
    assert everything["items"][0]["name"] == f"Acme {tag} 4" and everything["items"][0]["balance"]["balance"] == 5000
    seen, after = [], None
    for expected_more in (True, True, False):
        page = (await api.get(path, params={"q": f"ACME {tag}", "limit": 2,
                                            **({"starting_after": after} if after else {})})).json()
        seen += [a["id"] for a in page["items"]]
        assert page["has_more"] is expected_more
        after = page["items"][-1]["id"]
    assert seen == ids[::-1]
    back = (await api.get(path, params={"q": tag, "limit": 2, "ending_before": ids[1]})).json()
    assert [a["id"] for a in back["items"]] == [ids[3], ids[2]] and back["has_more"] is True
    by_email = (await api.get(path, params={"q": f"ap-{tag}@"})).json()
    assert [a["id"] for a in by_email["items"]] == [other]
    by_external = (await api.get(path, params={"external_id": f"ext-{tag}-3"})).json()
    assert [a["id"] for a in by_external["items"]] == [ids[3]] and by_external["has_more"] is False
    assert (await api.get(path, params={"external_id": f"ext-{tag}-9"})).json()["items"] == []
    assert (await api.get(path, params={"q": "100%_" + tag})).json()["items"] == []  # LIKE wildcards are literal
    active = (await api.get(path, params={"q": tag, "status": "active"})).json()
    assert len(active["items"]) == 6
    assert (await api.get(path, params={"q": tag, "status": "closed"})).json()["items"] == []
    unknown = await api.get(path, params={"starting_after": "acc_" + "0" * 32})
    assert assert_error(unknown, 422, "validation_error")["param"] == "starting_after"
    assert_error(await api.get(path, params={"limit": 0}), 422, "validation_error")


async def test_accounts_list_is_admin_only(api: httpx.AsyncClient) -> None:
    acc = await new_account(api)
    key = (await api.post(f"/api/v1/accounts/{acc}/api-keys", json={"scopes": ["billing:read"]})).json()["secret"]
    resp = await api.get("/api/v1/accounts", headers={"Authorization": f"Bearer {key}"})
    assert resp.status_code == 403, resp.text
    assert resp.json()["error"]["type"] == "permission_error"
