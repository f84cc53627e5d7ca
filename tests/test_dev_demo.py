"""`creditflow dev --demo` shows what an operator will see: the agents its usage names are registered, so
`agents list`, limits and pause/resume work on the demo accounts as on real ones."""

from __future__ import annotations

import asyncio
import io

import httpx
from rich.console import Console

from creditflow.api.app import create_app
from creditflow.config import Settings
from creditflow.embedded import DEMO_ACCOUNTS, DemoDriver, DemoStats
from tests.conftest import ADMIN_KEY, serve_app


async def test_the_demo_registers_the_agents_its_usage_names(settings: Settings) -> None:
    async with serve_app(create_app(settings)) as base:
        driver = DemoDriver(base, ADMIN_KEY, Console(file=io.StringIO()), check=lambda: None, events=0,
                            temporal_ui_url="")

        def prepare() -> list[DemoStats]:  # the driver is synchronous: off the loop that serves the app
            all_stats = [DemoStats(account=a) for a in DEMO_ACCOUNTS]
            for stats in all_stats:
                stats.account_id = driver.ensure_account(stats.account)
                driver.ensure_agents(stats)
                driver.ensure_agents(stats)  # a rerun of the demo finds them registered
            return all_stats

        all_stats = await asyncio.to_thread(prepare)
        async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as client:
            for stats in all_stats:
                listed = await client.get("/api/v1/agents", params={"account_id": stats.account_id})
                assert listed.status_code == 200, listed.text
                agents = {a["id"]: a for a in listed.json()["items"]}
                assert set(agents) == set(stats.account.agents)
                assert all(a["status"] == "active" for a in agents.values())
    assert {a for account in DEMO_ACCOUNTS for a in account.agents} == {
        "support-bot", "returns-bot", "outbound-caller", "sdr-agent", "it-helper"}
