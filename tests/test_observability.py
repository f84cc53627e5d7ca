"""Metrics, structured logs and health of the API and the worker, on the real app, database and Temporal."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import stripe
from pydantic import SecretStr
from temporalio.testing import WorkflowEnvironment

from creditflow.api.app import create_app
from creditflow.config import Settings
from creditflow.observability.logs import configure_logging, scrub
from creditflow.observability.metrics import MetricsServer, sample
from tests.conftest import ADMIN_KEY, STRIPE_KEY, _temporal_cli, free_port, new_card
from tests.support.api import new_account, track

TOPUP = "/api/v1/billing/wallet/topup"
CARDS = "/api/v1/billing/payment-methods"
DECLINED_AT_CHARGE = "4000000000000341"


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    """creditflow's JSON logging into a buffer, as ``CREDITFLOW_LOG_FORMAT=json`` sets it up; restored after."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    flags = {name: getattr(logging, name) for name in ("_srcfile", "logThreads", "logProcesses", "logMultiprocessing")}
    buffer = io.StringIO()
    configure_logging("INFO", "json", buffer)
    yield buffer
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in saved[0]:
        root.addHandler(handler)
    root.setLevel(saved[1])
    for name, value in flags.items():
        setattr(logging, name, value)


def parsed(buffer: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines() if line.strip()]


async def app_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://creditflow.test",
            headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60) as client:
        yield client


# --- secrets ---------------------------------------------------------------------------------------------


def test_scrub_removes_every_kind_of_secret() -> None:
    line = ("key cf_sk_AbCdEfGh12345678xyz admin cf_admin_0123456789abcdef stripe sk_live_51HxYzAbCdEf "
            "sk_test_creditflow_tests whsec_abcDEF123456 Authorization: Bearer cf_sk_zzzzzzzzzzzz "
            "postgresql://creditflow:s3cr3t-pw@db:5432/creditflow card 4242 4242 4242 4242 and 4000000000000341 "
            "smtp_password=hunter22 auth_token: tw-123456")
    out = scrub(line)
    for secret in ("AbCdEfGh12345678xyz", "0123456789abcdef", "51HxYzAbCdEf", "creditflow_tests", "abcDEF123456",
                   "zzzzzzzzzzzz", "s3cr3t-pw", "4242 4242 4242 4242", "4000000000000341", "hunter22", "tw-123456"):
        assert secret not in out, (secret, out)
    assert "postgresql://creditflow:***@db:5432/creditflow" in out
    assert "424242***4242" in out and "400000***0341" in out
    # Numbers that are not card numbers (fail the Luhn check) stay: balances in micro-credits are logged.
    assert scrub("balance_micros=5000000000001") == "balance_micros=5000000000001"


# --- API: one line per request, ids, refusals at INFO, metrics ---------------------------------------------


async def test_one_json_line_per_request_with_request_and_account_ids(api: httpx.AsyncClient,
                                                                   log_lines: io.StringIO) -> None:
    account = await new_account(api)
    ok = await track(api, account, "llm_tokens", 1000, "k-1")
    assert ok.status_code == 200, ok.text
    refused = await track(api, account, "llm_tokens", 10**9, "k-2")
    assert refused.status_code == 402 and refused.json()["code"] == "insufficient_credits"
    bad = await api.post("/api/v1/billing/track", json={"account_id": account, "feature_id": "nope", "value": 1,
                                                        "idempotency_key": "k-3"})
    assert bad.status_code == 404

    lines = [r for r in parsed(log_lines) if r["logger"] == "creditflow.access"]
    assert [(r["route"], r["status"]) for r in lines] == [
        ("/api/v1/accounts", 201), ("/api/v1/billing/track", 200), ("/api/v1/billing/track", 402),
        ("/api/v1/billing/track", 404)]
    assert [r["request_id"] for r in lines[1:]] == [ok.headers["x-request-id"], refused.headers["x-request-id"],
                                                   bad.headers["x-request-id"]]
    assert all(r["account_id"] == account for r in lines[1:])
    assert all(r["level"] == "info" and "exception" not in r for r in lines)  # refusals: INFO, no traceback
    assert ADMIN_KEY not in log_lines.getvalue()


async def test_api_metrics_count_requests_events_and_debits(api: httpx.AsyncClient) -> None:
    def value(text: str, name: str, **labels: str) -> float:
        return sample(text, name, labels) or 0.0

    before = (await api.get("/metrics")).text
    account = await new_account(api)
    for i in range(3):
        assert (await track(api, account, "llm_tokens", 1000, f"t-{i}")).status_code == 200
    assert (await track(api, account, "llm_tokens", 1000, "t-0")).json()["replayed"] is True
    assert (await track(api, account, "llm_tokens", 10**9, "t-big")).status_code == 402
    after = await api.get("/metrics")
    assert after.status_code == 200 and after.headers["content-type"].startswith("text/plain")
    text = after.text
    events = "creditflow_usage_events_total"
    assert value(text, events, outcome="tracked", code="ok") - value(before, events, outcome="tracked", code="ok") == 3
    assert value(text, events, outcome="replayed", code="ok") - value(before, events, outcome="replayed",
                                                                      code="ok") == 1
    assert value(text, events, outcome="denied", code="insufficient_credits") - value(
        before, events, outcome="denied", code="insufficient_credits") == 1
    charged = (await api.get("/api/v1/billing/transactions", params={"account_id": account, "type": "usage"})).json()
    debited = -sum(t["amount"] for t in charged["items"]) * 1_000_000
    assert debited > 0
    assert value(text, "creditflow_debited_micros_total") - value(before, "creditflow_debited_micros_total") == debited
    route = {"method": "POST", "route": "/api/v1/billing/track"}
    assert value(text, "creditflow_http_requests_total", **route, status="200") - value(
        before, "creditflow_http_requests_total", **route, status="200") == 4  # 3 tracked + 1 replay
    assert value(text, "creditflow_http_request_duration_seconds_count", **route) > 0


def test_multiprocess_mode_sums_every_api_process(tmp_path: Path) -> None:
    """Several API processes (uvicorn --workers N, gunicorn) write to PROMETHEUS_MULTIPROC_DIR; /metrics sums."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PYTHONPATH": os.getcwd()}
    record = ("from creditflow.observability.metrics import record_usage\n"
              "for _ in range(3): record_usage(True, 'ok', 5, False)")
    for _ in range(2):
        subprocess.run([sys.executable, "-c", record], env=env, check=True, timeout=60)
    read = textwrap.dedent("""
        from creditflow.observability.metrics import api_registry, exposition, sample
        text = exposition(api_registry()).decode()
        print(sample(text, "creditflow_usage_events_total", {"outcome": "tracked"}),
              sample(text, "creditflow_debited_micros_total"))
    """)
    out = subprocess.run([sys.executable, "-c", read], env=env, check=True, timeout=60, capture_output=True, text=True)
    assert out.stdout.split() == ["6.0", "30.0"]


# --- health -----------------------------------------------------------------------------------------------


async def test_readyz_fails_when_temporal_is_unreachable(settings: Settings) -> None:
    down = settings.model_copy(update={"temporal_address": f"127.0.0.1:{free_port()}"})
    async for client in app_client(down):
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        resp = await client.get("/readyz")
        assert resp.status_code == 503
        body = resp.json()
        assert body["status"] == "unavailable" and body["checks"]["database"] == "ok"
        assert body["checks"]["temporal"].startswith("unavailable")


@pytest.mark.slow
async def test_readyz_follows_temporal_going_down(settings: Settings) -> None:
    from temporalio.contrib.pydantic import pydantic_data_converter

    env = await WorkflowEnvironment.start_local(dev_server_existing_path=_temporal_cli(),
                                                data_converter=pydantic_data_converter, dev_server_log_level="error")
    stopped = False
    try:
        up = settings.model_copy(update={"temporal_address": env.client.service_client.config.target_host})
        async for client in app_client(up):
            ready = await client.get("/readyz")
            assert ready.status_code == 200, ready.text
            assert ready.json() == {"status": "ok", "checks": {"database": "ok", "temporal": "ok"}}
            await env.shutdown()
            stopped = True
            resp = await client.get("/readyz")
            assert resp.status_code == 503 and resp.json()["checks"]["temporal"].startswith("unavailable")
            assert resp.json()["checks"]["database"] == "ok"
    finally:
        if not stopped:
            await env.shutdown()


def test_worker_metrics_ports_never_fight() -> None:
    """Port 0 picks a free port: two workers on one host each get their own endpoint."""
    first, second = MetricsServer("127.0.0.1", 0).start(), MetricsServer("127.0.0.1", 0).start()
    try:
        assert first.port != second.port and first.port > 0
        for server in (first, second):
            assert httpx.get(server.url, timeout=5).status_code == 200
            assert httpx.get(server.url.replace("/metrics", "/healthz"), timeout=5).json() == {"status": "ok"}
    finally:
        first.stop()
        second.stop()


# --- worker: one line per activity attempt ----------------------------------------------------------------


@pytest.fixture
def stripe_settings(temporal_settings: Settings, stripe_base: str) -> Settings:
    return temporal_settings.model_copy(update={
        "stripe_api_key": SecretStr(STRIPE_KEY),
        "stripe_api_base": stripe_base, "stripe_retry_max_wait_seconds": 0.1, "topup_poll_interval_seconds": 0.3})


@pytest.mark.slow
async def test_activity_attempts_logged_once_with_ids_and_refusals_quiet(
        stripe_settings: Settings, temporal_client: Any, pool: Any, sdk: stripe.StripeClient,
        log_lines: io.StringIO) -> None:
    from workers.main import build_worker

    async with build_worker(temporal_client, pool, stripe_settings):
        async for api in app_client(stripe_settings):
            account = await new_account(api)
            card = await api.post(CARDS, json={"account_id": account,
                                               "payment_method_id": new_card(sdk, DECLINED_AT_CHARGE)})
            assert card.status_code == 201, card.text
            resp = await api.post(TOPUP, json={"account_id": account, "amount_usd": 40, "request_id": "obs-1"})
            assert resp.status_code == 402 and resp.json()["error"]["code"] == "card_declined"
    records = parsed(log_lines)
    attempts = [r for r in records if r["logger"] == "creditflow.activity"]
    workflow = f"topup:{account}:obs-1"
    charge = [r for r in attempts if r["activity"] == "charge_topup"]
    assert len(charge) == 1, attempts
    assert charge[0]["level"] == "info" and charge[0]["outcome"] == "refused" and charge[0]["code"] == "card_declined"
    assert (charge[0]["workflow_id"], charge[0]["account_id"], charge[0]["attempt"]) == (workflow, account, 1)
    assert any(r["outcome"] == "completed" and r["workflow_id"] == workflow for r in attempts)
    assert not any("exception" in r or r["level"] in ("warning", "error") for r in records
                   if r.get("workflow_id") == workflow or "Completing activity" in r["message"]), records
    assert STRIPE_KEY not in log_lines.getvalue() and ADMIN_KEY not in log_lines.getvalue()


async def test_startup_line_says_what_the_api_connected_to(settings: Settings, log_lines: io.StringIO) -> None:
    secret_url = settings.database_url + ("&" if "?" in settings.database_url else "?") + "password=pg-s3cret"
    async for client in app_client(settings.model_copy(update={"stripe_api_key": SecretStr("sk_live_abcdef123456")})):
        assert (await client.get("/healthz")).status_code == 200
    [line] = [r for r in parsed(log_lines) if r.get("event") == "startup"]
    assert line["service"] == "api" and settings.temporal_address in line["message"]
    assert "database" in line["message"]
    assert scrub(secret_url).endswith("password=***")
    assert "abcdef123456" not in log_lines.getvalue() and ADMIN_KEY not in log_lines.getvalue()


# --- the real stack: `creditflow dev`, its API and worker processes ----------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_dev_stack_metrics_health_and_logs_after_usage(tmp_path: Path) -> None:
    """Usage, top-ups (one succeeded, one declined) through the real stack; then both /metrics show them, the
    worker's health check passes, and no service log holds a secret."""
    from creditflow.embedded import ADMIN_KEY_FILE, STATE_FILE, WEBHOOK_SECRET_FILE
    from tests.support.dev_stack import CREDITFLOW, Dev, clean_env, start

    runs: list[Dev] = []
    data_dir = tmp_path / "data"
    try:
        run = start(runs, data_dir, tmp_path / "dev.log")
        state = json.loads((data_dir / STATE_FILE).read_text())
        assert state["api_metrics_url"] == f"{run.api}/metrics"
        key = (data_dir / ADMIN_KEY_FILE).read_text().strip()
        api = httpx.Client(base_url=run.api, headers={"Authorization": f"Bearer {key}"}, timeout=60)
        sdk = stripe.StripeClient("sk_test_creditflow_localstripe", base_addresses={"api": state["stripe_url"]})

        accounts = []
        for card_number, name in (("4242424242424242", "Paying"), (DECLINED_AT_CHARGE, "Declined")):
            created = api.post("/api/v1/accounts", json={"name": name, "billing_email": "ops@example.com"})
            assert created.status_code == 201, created.text
            account = created.json()["id"]
            accounts.append(account)
            saved = api.post(CARDS, json={"account_id": account, "payment_method_id": new_card(sdk, card_number)})
            assert saved.status_code == 201, saved.text
        paying, declined = accounts
        for i in range(3):
            resp = api.post("/api/v1/billing/track", json={"account_id": paying, "feature_id": "chat_message",
                                                           "value": 1, "idempotency_key": f"m-{i}"})
            assert resp.status_code == 200, resp.text
        denied = api.post("/api/v1/billing/track", json={"account_id": paying, "feature_id": "llm_tokens",
                                                         "value": 10**9, "idempotency_key": "huge"})
        assert denied.status_code == 402
        assert api.post(TOPUP, json={"account_id": paying, "amount_usd": 25, "request_id": "r1"}).status_code == 200
        assert api.post(TOPUP, json={"account_id": declined, "amount_usd": 25,
                                     "request_id": "r1"}).json()["error"]["code"] == "card_declined"

        ready = httpx.get(f"{run.api}/readyz", timeout=10)
        assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok", "temporal": "ok"}

        text = httpx.get(state["api_metrics_url"], timeout=10).text
        assert sample(text, "creditflow_usage_events_total", {"outcome": "tracked"}) == 3
        assert sample(text, "creditflow_usage_events_total", {"outcome": "denied", "code": "insufficient_credits"}) == 1
        assert sample(text, "creditflow_debited_micros_total") == 3_000_000  # 3 chat messages at 1 credit
        assert sample(text, "creditflow_http_requests_total", {"route": "/api/v1/billing/wallet/topup",
                                                               "status": "200"}) == 1

        worker_url = state["worker_metrics_url"]

        def worker_text() -> str:
            return httpx.get(worker_url, timeout=10).text

        run.wait_for("the worker's figures", lambda: sample(worker_text(), "creditflow_topups_total",
                                                            {"outcome": "failed"}) == 1, timeout=60)
        text = worker_text()
        assert sample(text, "creditflow_topups_total", {"outcome": "succeeded"}) == 1
        assert sample(text, "creditflow_outbox_lag_seconds") is not None
        assert sample(text, "creditflow_webhook_lag_seconds") is not None
        assert sample(text, "creditflow_reconciliation_differences", {"resolution": "reported"}) is not None
        sdk_metrics = [line for line in text.splitlines() if line.startswith("temporal_") and not line.endswith(" 0")]
        assert any(line.startswith("temporal_activity_execution_latency") for line in sdk_metrics), text[-3000:]

        # Every metric the dashboard and the alert rules use is one the API or a worker exports.
        exported = _metric_names(httpx.get(state["api_metrics_url"], timeout=10).text + worker_text())
        used = _deploy_metric_names()
        assert used - exported == set() and len(used) > 15

        health = subprocess.run([str(CREDITFLOW), "worker-health", "--url", worker_url.replace("/metrics", "/healthz")],
                                capture_output=True, text=True, timeout=60, env=clean_env())
        assert health.returncode == 0, health.stdout + health.stderr
        assert '"worker": "running"' in health.stdout and '"relay": "running"' in health.stdout

        logs_text = "".join(p.read_text(errors="replace") for p in (data_dir / "logs").glob("*.log"))
        assert "creditflow api" in logs_text and "creditflow worker" in logs_text  # the start-up lines
        secret = (data_dir / WEBHOOK_SECRET_FILE).read_text().strip()
        for value in (key, secret, "sk_test_creditflow_localstripe"):
            assert value not in logs_text
        run.stop()
    finally:
        for r in runs:
            r.kill()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_both_metrics_endpoints_show_non_zero_figures_after_the_demo(tmp_path: Path) -> None:
    """The issue's check as an operator runs it: `creditflow dev --demo`, then curl the API's and a worker's
    /metrics (their URLs from dev-stack.json). The demo's usage, its card top-up and its refused event of an
    agent paused by hand are counted; every charge outcome and notification channel is exported, 0 included."""
    from creditflow.embedded import STATE_FILE
    from tests.support.dev_stack import Dev, start

    runs: list[Dev] = []
    data_dir = tmp_path / "data"
    try:
        run = start(runs, data_dir, tmp_path / "dev.log", "--demo", "--demo-events", "30")
        run.wait_for("the demo", lambda: "demo done:" in run.output(), timeout=300)
        out = run.output()
        assert "card top-up of $10 -> succeeded (+1000 credits)" in out, out[-3000:]
        assert "its next event refused (agent_paused), resumed" in out, out[-3000:]
        assert "demo done: 31 usage events, 30 allowed, 1 denied" in out, out[-3000:]
        state = json.loads((data_dir / STATE_FILE).read_text())

        api_text = httpx.get(state["api_metrics_url"], timeout=10).text
        assert sample(api_text, "creditflow_usage_events_total", {"outcome": "tracked", "code": "ok"}) == 30
        assert sample(api_text, "creditflow_usage_events_total", {"outcome": "denied", "code": "agent_paused"}) == 1
        assert (sample(api_text, "creditflow_debited_micros_total") or 0) > 0
        assert sample(api_text, "creditflow_http_requests_total", {"route": TOPUP, "status": "200"}) == 1
        assert sample(api_text, "creditflow_http_requests_total", {"route": "/api/v1/billing/track",
                                                                   "status": "200"}) == 30  # the refusal: 4xx

        def worker_text() -> str:
            return httpx.get(state["worker_metrics_url"], timeout=10).text

        run.wait_for("the worker's figures", lambda: sample(worker_text(), "creditflow_topups_total",
                                                            {"outcome": "succeeded"}) == 1, timeout=60)
        text = worker_text()
        for family in ("creditflow_auto_recharges_total", "creditflow_invoice_charges_total"):
            assert sample(text, family, {"outcome": "failed"}) == 0, family
        assert sample(text, "creditflow_notification_failures_total", {"channel": "webhook"}) == 0
        assert sample(text, "creditflow_outbox_lag_seconds") is not None
        assert sample(text, "creditflow_reconciliation_differences", {"resolution": "reported"}) == 0
        busy = [line for line in text.splitlines() if line.startswith("temporal_") and not line.endswith(" 0")]
        assert any(line.startswith("temporal_activity_execution_latency") for line in busy), text[-3000:]
        assert any(line.startswith("temporal_workflow_completed") for line in busy), text[-3000:]
        run.stop()
    finally:
        for r in runs:
            r.kill()


def test_worker_exports_every_charge_outcome_and_channel_before_the_first() -> None:
    """A fresh worker (nothing charged, nothing failed) still exports each outcome and channel at 0: an alert's
    rate() sees the first failure as an increase, and dashboards show 0 rather than "no data"."""
    from creditflow.observability.metrics import DatabaseStats, exposition

    text = exposition(DatabaseStats(charges={("topup", "succeeded"): 2})).decode()
    for family in ("creditflow_topups_total", "creditflow_auto_recharges_total", "creditflow_invoice_charges_total"):
        for outcome in ("succeeded", "failed", "canceled", "pending"):
            expected = 2 if (family, outcome) == ("creditflow_topups_total", "succeeded") else 0
            assert sample(text, family, {"outcome": outcome}) == expected, (family, outcome)
    for channel in ("log", "email", "slack", "sms", "webhook"):
        assert sample(text, "creditflow_notification_failures_total", {"channel": channel}) == 0, channel


DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def _metric_names(exposition_text: str) -> set[str]:
    """Family names (``# TYPE`` lines) and sample names of an exposition."""
    names = set()
    for line in exposition_text.splitlines():
        if line.startswith("# TYPE "):
            names.add(line.split()[2])
        elif line and not line.startswith("#"):
            names.add(line.split("{")[0].split(" ")[0])
    return names


def _deploy_metric_names() -> set[str]:
    import re

    import yaml

    exprs = [rule["expr"] for group in yaml.safe_load((DEPLOY / "prometheus-alerts.yml").read_text())["groups"]
             for rule in group["rules"]]
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    exprs += [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    return {m for e in exprs for m in re.findall(r"\b((?:creditflow|temporal)_[a-z_]+)", e)}


def test_deploy_files_parse_and_use_creditflow_metrics() -> None:
    used = _deploy_metric_names()
    assert {"creditflow_outbox_lag_seconds", "creditflow_usage_events_total", "creditflow_auto_recharges_total",
            "creditflow_reconciliation_differences", "temporal_activity_execution_failed"} <= used


def test_worker_health_finds_the_port_a_worker_picked(tmp_path: Path, settings: Settings) -> None:
    """With port 0 the worker writes the port it bound to CREDITFLOW_WORKER_METRICS_PORT_FILE; the probe reads it."""
    from creditflow.observability.probe import check_worker, worker_health_url

    server = MetricsServer("127.0.0.1", 0, health=lambda: (False, {"status": "unavailable"})).start()
    try:
        port_file = tmp_path / "worker.port"
        port_file.write_text(f"{server.port}\n")
        configured = settings.model_copy(update={"worker_metrics_port_file": port_file})
        url = worker_health_url(configured)
        assert url == f"http://127.0.0.1:{server.port}/healthz"
        assert check_worker(url) == (False, '{"status": "unavailable"}')
        assert worker_health_url(settings.model_copy(update={"worker_metrics_port": 9464})) == \
            "http://127.0.0.1:9464/healthz"
        assert worker_health_url(settings) is None  # port 0 and no file: nothing to ask
    finally:
        server.stop()
