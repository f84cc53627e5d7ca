"""Worker subprocesses for tests that kill them (fault injection, scale-out): each with the test's settings and an
optional fault point armed."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from activities.topups import FAULT_INJECT_ENV
from creditflow.config import Settings

ROOT = Path(__file__).resolve().parents[2]
WORKER = ("import asyncio; from creditflow.config import Settings; from workers.main import run_worker; "
          "asyncio.run(run_worker(Settings()))")


class Workers:
    """Worker subprocesses of one test; whatever is still alive is killed at teardown."""

    def __init__(self, settings: Settings, logs: Path) -> None:
        self.settings = settings
        self.logs = logs
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, fault: str | None = None) -> subprocess.Popen[bytes]:
        s = self.settings
        env = {k: v for k, v in os.environ.items() if k != FAULT_INJECT_ENV and not k.startswith("CREDITFLOW_")}
        env.update({
            "CREDITFLOW_DATABASE_URL": s.database_url,
            "CREDITFLOW_TEMPORAL_ADDRESS": s.temporal_address,
            "CREDITFLOW_TEMPORAL_NAMESPACE": s.temporal_namespace,
            "CREDITFLOW_TEMPORAL_TASK_QUEUE": s.temporal_task_queue,
            "CREDITFLOW_STRIPE_API_BASE": s.stripe_api_base,
            "CREDITFLOW_STRIPE_API_KEY": s.stripe_api_key.get_secret_value(),
            "CREDITFLOW_STRIPE_RETRY_MAX_WAIT_SECONDS": "0.1",
            "CREDITFLOW_DB_POOL_MIN_SIZE": "1",
            "CREDITFLOW_DB_POOL_MAX_SIZE": "4",
        })
        if fault is not None:
            env[FAULT_INJECT_ENV] = fault
        log = (self.logs / f"worker-{len(self.procs)}.log").open("wb")
        proc = subprocess.Popen([sys.executable, "-c", WORKER], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        log.close()
        self.procs.append(proc)
        return proc

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


async def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if time.monotonic() > deadline:
            raise AssertionError(f"worker {proc.pid} still alive after {timeout} s")
        await asyncio.sleep(0.1)
    return proc.returncode


@pytest.fixture
def workers(temporal_settings: Settings, tmp_path: Path) -> Iterator[Workers]:
    """``creditflow worker`` subprocesses for the test (killed at its end, whatever happened)."""
    started = Workers(temporal_settings, tmp_path)
    try:
        yield started
    finally:
        started.kill_all()
