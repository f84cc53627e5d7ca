"""Named credit systems for tests: seed 003's transcription credits, keys as request headers."""

from __future__ import annotations

import httpx

SYSTEM = "transcription-credits"
FEATURE = "audio-transcription-minutes"


async def key_headers(api: httpx.AsyncClient, account_id: str, *scopes: str) -> dict[str, str]:
    """An API key of the account with these scopes, as request headers."""
    resp = await api.post(f"/api/v1/accounts/{account_id}/api-keys", json={"name": "svc", "scopes": list(scopes)})
    assert resp.status_code == 201, resp.text
    return {"Authorization": f"Bearer {resp.json()['secret']}"}


async def transcription_system(api: httpx.AsyncClient) -> None:
    """Seed 003's example: audio transcription at 3 credits a minute, on its own credit system."""
    created = await api.post("/api/v1/credit-systems", json={"id": SYSTEM, "name": "Transcription credits"})
    assert created.status_code == 201, created.text
    feature = await api.put(f"/api/v1/features/{FEATURE}", json={
        "channel": "transcription", "unit": "minute", "credits_per_unit": 3, "credit_system": SYSTEM})
    assert feature.status_code == 200, feature.text
    assert feature.json()["credit_system"] == SYSTEM and feature.json()["credits_per_unit"] == 3
