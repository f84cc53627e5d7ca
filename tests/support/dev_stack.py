"""The dev stack (`creditflow dev`) as a subprocess, for the tests that start it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
import pytest

from creditflow.embedded import STATE_FILE

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


def start(runs: list[Dev], data_dir: Path, log: Path, *args: str) -> Dev:
    """Start ``creditflow dev`` on ``data_dir``. A new data dir is a link to a directory directly under the system's
    temp dir: as root, embedded PostgreSQL runs as its own user, which must traverse every parent of its data, and
    pytest keeps its own temp root (``pytest-of-root``) closed to other users (a doc-examples run in CI failed with
    ``could not open .../global/pg_control: Permission denied``)."""
    if not data_dir.exists() and not data_dir.is_symlink():
        real = Path(tempfile.mkdtemp(prefix="creditflow-dev-test-"))
        real.chmod(0o755)
        data_dir.symlink_to(real, target_is_directory=True)
    for attempt in range(3):
        run = Dev(data_dir, log, *args)
        runs.append(run)
        try:
            run.wait_for("GET /healthz", lambda url=f"{run.api}/healthz": httpx.get(url, timeout=2).json() == {
                "status": "ok"})
            break
        except pytest.fail.Exception as exc:
            # The free ports are picked, released, then bound by the stack's servers: under a full suite another
            # process can take one in between (Temporal: "bind: address already in use"). Try again on new ports.
            if "address already in use" not in str(exc) or attempt == 2:
                raise
            run.kill()
            runs.remove(run)
    # The banner comes last, once the worker is up too.
    run.wait_for("the banner", lambda: "to stop everything" in run.output())
    return run
