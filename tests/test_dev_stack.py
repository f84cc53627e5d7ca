"""`creditflow dev` as a newcomer runs it: the whole stack comes up, answers, keeps its data and admin key
between runs, and Ctrl-C leaves no process behind (a leaked postgres or temporal holds ports and data)."""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from creditflow.embedded import ADMIN_KEY_FILE, STATE_FILE, load_or_create_secret

CREDITFLOW = Path(sys.executable).parent / "creditflow"
START_TIMEOUT = 240.0
STOP_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env() -> dict[str, str]:
    """The developer's or CI's CREDITFLOW_* must not leak into the stack under test."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CREDITFLOW_")}
    env["COLUMNS"] = "200"  # keep banner lines unwrapped in the captured output
    return env


class Dev:
    """One ``creditflow dev`` run, its output captured in a file (a pipe could fill up and block it)."""

    def __init__(self, data_dir: Path, log: Path, *args: str) -> None:
        self.data_dir = data_dir
        self.log = log
        self.ports = {"api": free_port(), "temporal": free_port(), "ui": free_port(), "stripe": free_port()}
        argv = [str(CREDITFLOW), "dev", "--data-dir", str(data_dir), "--api-port", str(self.ports["api"]),
                "--temporal-port", str(self.ports["temporal"]), "--temporal-ui-port", str(self.ports["ui"]),
                "--stripe-port", str(self.ports["stripe"]), *args]
        with log.open("wb") as out:
            self.popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=clean_env())

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.ports['api']}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, what: str, probe: Callable[[], bool], timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                pytest.fail(f"creditflow dev exited ({self.popen.returncode}) before {what}:\n{self.output()}")
            try:
                if probe():
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        pytest.fail(f"{what} not ready after {timeout:.0f}s:\n{self.output()}")

    def processes(self) -> list[psutil.Process]:
        """Everything this run started: its child tree, and PostgreSQL (a daemon, not our child)."""
        procs = psutil.Process(self.popen.pid).children(recursive=True)
        pid_file = self.data_dir / "postgres" / "postmaster.pid"
        if pid_file.exists():
            postmaster = psutil.Process(int(pid_file.read_text().splitlines()[0]))
            procs += [postmaster, *postmaster.children(recursive=True)]
        return procs

    def stop(self) -> None:
        """Ctrl-C, then: a prompt exit, exit code 0, and no survivor."""
        procs = self.processes()
        self.popen.send_signal(signal.SIGINT)
        try:
            code = self.popen.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            pytest.fail(f"creditflow dev did not exit within {STOP_TIMEOUT:.0f}s of SIGINT:\n{self.output()}")
        assert code == 0, self.output()
        psutil.wait_procs(procs, timeout=10)
        survivors = [p for p in procs if alive(p)]
        assert not survivors, f"left running: {[(p.pid, p.cmdline()) for p in survivors]}"
        assert not (self.data_dir / STATE_FILE).exists()

    def kill(self) -> None:
        """Last resort for a failed test: never leave a stack running on the CI machine."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)
            try:
                self.popen.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.popen.kill()


def alive(proc: psutil.Process) -> bool:
    """Zombies count as gone: an orphaned postmaster is reparented to PID 1, which may never reap it."""
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def dev_runs(tmp_path: Path) -> Iterator[list[Dev]]:
    runs: list[Dev] = []
    yield runs
    for run in runs:
        run.kill()


def start(runs: list[Dev], data_dir: Path, log: Path) -> Dev:
    run = Dev(data_dir, log)
    runs.append(run)
    run.wait_for("GET /healthz", lambda: httpx.get(f"{run.api}/healthz", timeout=2).json() == {"status": "ok"})
    # The banner comes last, once the worker is up too.
    run.wait_for("the banner", lambda: "to stop everything" in run.output())
    return run


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
