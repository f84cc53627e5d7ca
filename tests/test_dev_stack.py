"""`creditflow dev` as a newcomer runs it: the whole stack comes up, answers, keeps its data and admin key
between runs, and Ctrl-C leaves no process behind (a leaked postgres or temporal holds ports and data)."""

from __future__ import annotations

import fcntl
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from creditflow.embedded import ADMIN_KEY_FILE, load_or_create_secret
from tests.support.dev_stack import CREDITFLOW, Dev, clean_env, start


@pytest.fixture
def dev_runs(tmp_path: Path) -> Iterator[list[Dev]]:
    runs: list[Dev] = []
    yield runs
    for run in runs:
        run.kill()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_dev_stack_starts_serves_keeps_data_and_stops_cleanly(tmp_path: Path, dev_runs: list[Dev]) -> None:
    data_dir = tmp_path / "data"
    first = start(dev_runs, data_dir, tmp_path / "dev1.log")

    # Every URL in the banner answers.
    assert httpx.get(f"{first.api}/docs", timeout=5).status_code == 200
    first.wait_for("Temporal UI", lambda: httpx.get(f"http://127.0.0.1:{first.ports['ui']}/", timeout=5).status_code
                   == 200, timeout=30)
    stripe = httpx.get(f"http://127.0.0.1:{first.ports['stripe']}/v1/customers", auth=("sk_test_x", ""), timeout=5)
    assert stripe.status_code == 200

    key = (data_dir / ADMIN_KEY_FILE).read_text().strip()
    assert key and key in first.output()
    assert (data_dir / ADMIN_KEY_FILE).stat().st_mode & 0o777 == 0o600
    for url in (f"{first.api}/docs", f"127.0.0.1:{first.ports['temporal']}", f"127.0.0.1:{first.ports['ui']}",
                f"127.0.0.1:{first.ports['stripe']}"):
        assert url in first.output()

    auth = {"Authorization": f"Bearer {key}"}
    body = {"name": "Dev Stack Test", "billing_email": "dev@example.com", "external_id": "dev-stack-test"}
    created = httpx.post(f"{first.api}/api/v1/accounts", json=body, headers=auth, timeout=10)
    assert created.status_code == 201, created.text
    account_id = created.json()["id"]

    names = " ".join(" ".join(p.cmdline()) for p in first.processes())
    for expected in ("postgres", "temporal", "localstripe", "creditflow.cli worker", "creditflow.cli api"):
        assert expected in names, f"{expected} not running: {names}"
    first.stop()

    # Same data dir: the account and the admin key survive the restart.
    second = start(dev_runs, data_dir, tmp_path / "dev2.log")
    assert (data_dir / ADMIN_KEY_FILE).read_text().strip() == key
    assert key in second.output()
    auth = {"Authorization": f"Bearer {key}"}
    again = httpx.get(f"{second.api}/api/v1/accounts/{account_id}", headers=auth, timeout=10)
    assert again.status_code == 200, again.text
    assert again.json()["id"] == account_id
    conflict = httpx.post(f"{second.api}/api/v1/accounts", json=body, headers=auth, timeout=10)
    assert conflict.status_code == 409
    assert conflict.json()["error"]["details"]["account_id"] == account_id
    second.stop()


def test_a_taken_port_fails_fast_with_a_clear_message(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = subprocess.run([str(CREDITFLOW), "dev", "--data-dir", str(tmp_path / "data"), "--api-port",
                                 str(port)], capture_output=True, text=True, timeout=60, env=clean_env())
    assert result.returncode == 1
    assert f"port {port} (--api-port) is already in use" in result.stdout
    assert not (tmp_path / "data" / "postgres").exists(), "nothing may start when a port is taken"


def test_a_data_dir_in_use_is_refused(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with (data_dir / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = subprocess.run([str(CREDITFLOW), "dev", "--data-dir", str(data_dir), "--api-port", "0"],
                                capture_output=True, text=True, timeout=60, env=clean_env())
    assert result.returncode == 1
    assert "already using" in result.stdout
    assert not (data_dir / "postgres").exists()


def test_generated_secrets_are_private_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    first = load_or_create_secret(path, lambda: "s3cret")
    assert first == "s3cret"
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_or_create_secret(path, lambda: "other") == "s3cret"
