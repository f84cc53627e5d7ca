"""`creditflow api --workers N`: several processes serve one port against one ledger; `/metrics` sums them all."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

from creditflow.observability.metrics import sample
from tests.conftest import ADMIN_KEY, free_port

CREDITFLOW = Path(sys.executable).parent / "creditflow"
pytestmark = pytest.mark.slow


def test_two_api_processes_share_the_port_the_ledger_and_the_metrics(database_url: str, tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "CREDITFLOW_DATABASE_URL": database_url, "CREDITFLOW_ADMIN_API_KEY": ADMIN_KEY,
           "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "CREDITFLOW_WELCOME_BONUS_CREDITS": "5000"}
    proc = subprocess.Popen([str(CREDITFLOW), "api", "--workers", "2", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"the API did not start:\n{proc.communicate(timeout=10)[0]}")
            time.sleep(0.2)
        servers = [c for c in psutil.Process(proc.pid).children() if "spawn" in " ".join(c.cmdline())]
        assert len(servers) == 2, [c.cmdline() for c in psutil.Process(proc.pid).children()]

        created = httpx.post(f"{base}/api/v1/accounts", json={"name": "Two", "billing_email": "two@acme.test"},
                             headers=headers, timeout=10)
        assert created.status_code == 201, created.text
        account = created.json()["id"]
        def track(n: int) -> int:  # a new connection each time, 6 at once: both processes get some
            return httpx.post(f"{base}/api/v1/billing/track", headers=headers, timeout=30, json={
                "account_id": account, "feature_id": "chat_message", "value": 1,
                "idempotency_key": f"k-{n % 20}"}).status_code

        with ThreadPoolExecutor(6) as pool:
            assert set(pool.map(track, range(60))) == {200}
        balance = httpx.get(f"{base}/api/v1/billing/balance", params={"account_id": account}, headers=headers,
                            timeout=10).json()
        assert balance["balance"] == 5000 - 20  # 20 distinct keys, 40 replays charged nothing
        metrics = httpx.get(f"{base}/metrics", timeout=10).text
        assert sample(metrics, "creditflow_usage_events_total", {"outcome": "tracked"}) == 20, metrics[:3000]
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    # Each process wrote its request metrics to the shared directory: both served, /metrics sums them.
    served = {int(m.group(1)) for f in tmp_path.iterdir() if (m := re.fullmatch(r"histogram_(\d+)\.db", f.name))}
    assert served == {c.pid for c in servers}, (sorted(f.name for f in tmp_path.iterdir()), out)
