"""Traces: one OpenTelemetry trace from an API request through the Temporal client to the workflow and its
activities (real app, real Temporal dev server, the production worker, localstripe, PostgreSQL); and with
tracing off (the default) nothing of it runs: no provider, no SDK import, no OpenTelemetry call per request."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import stripe
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from psycopg_pool import AsyncConnectionPool

from creditflow.client import connect_temporal
from creditflow.config import Settings
from creditflow.observability.tracing import configure_tracing
from tests.conftest import ADMIN_KEY, STRIPE_KEY
from tests.support.api import app_client, bearer, key_for, new_account
from tests.support.payments import TOPUP, save_card
from tests.support.temporal import eventually
from workers.main import build_worker
from workflows.contract import topup_workflow_id

ROOT = Path(__file__).resolve().parent.parent

# One provider per process (configure_tracing builds it once): every traced test here shares this exporter. It is
# not installed as the global provider, so the rest of the test process stays untraced.
EXPORTER = InMemorySpanExporter()


@pytest.fixture
def settings(database_url: str, stripe_base: str) -> Settings:
    return Settings(database_url=database_url, admin_api_key=ADMIN_KEY,  # type: ignore[arg-type]
                    stripe_api_key=STRIPE_KEY, stripe_api_base=stripe_base,  # type: ignore[arg-type]
                    stripe_retry_max_wait_seconds=0.1)


@pytest.fixture
def traced_settings(temporal_settings: Settings) -> Settings:
    settings = temporal_settings.model_copy(update={"otel_traces": "console", "otel_service_name": "creditflow-test"})
    configure_tracing(settings, EXPORTER, set_global=False)
    EXPORTER.clear()
    return settings


@pytest.fixture
async def traced_api(traced_settings: Settings, pool: AsyncConnectionPool) -> AsyncIterator[httpx.AsyncClient]:
    """The real app and the production worker, both on Temporal clients made by ``connect_temporal``."""
    client = await connect_temporal(traced_settings)
    async with build_worker(client, pool, traced_settings):
        async for api in app_client(traced_settings):
            yield api


def _by_name(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    [span] = [s for s in spans if s.name == name]
    return span


def _ancestors(span: ReadableSpan, spans: list[ReadableSpan]) -> list[str]:
    """The names of ``span``'s ancestors in ``spans``, nearest first."""
    by_id = {s.context.span_id: s for s in spans}
    names = []
    while span.parent is not None and span.parent.span_id in by_id:
        span = by_id[span.parent.span_id]
        names.append(span.name)
    return names


@pytest.mark.temporal
async def test_a_topup_request_is_one_trace_from_the_api_to_the_activities(
        traced_api: httpx.AsyncClient, sdk: stripe.StripeClient) -> None:
    api = traced_api
    account = await new_account(api)
    await save_card(api, sdk, account)
    writer = bearer(await key_for(api, account, "payments:write"))

    resp = await api.post(TOPUP, headers=writer, json={"amount_usd": 25, "request_id": "order-1"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["status"] == "succeeded"
    request_id = resp.headers["x-request-id"]

    request = _by_name(EXPORTER.get_finished_spans(), f"POST {TOPUP}")
    trace_id = request.context.trace_id

    async def trace_spans() -> list[ReadableSpan]:
        return [s for s in EXPORTER.get_finished_spans() if s.context.trace_id == trace_id]

    # The workflow goes on after answering (credit, receipt): wait for it to complete.
    spans = await eventually(trace_spans, lambda spans: "CompleteWorkflow:TopUpWorkflow" in {s.name for s in spans})
    activities = ("record_topup_charge", "charge_topup", "credit_topup", "send_notification")
    assert sorted(s.name for s in spans) == sorted([
        f"POST {TOPUP}", "fastapi.dependencies", "fastapi.endpoint",  # the API (FastAPI's spans)
        "StartUpdateWithStartWorkflow:TopUpWorkflow",  # the API's Temporal client
        "RunWorkflow:TopUpWorkflow", "ValidateUpdate:answer", "HandleUpdate:answer",  # the worker
        *(f"StartActivity:{a}" for a in activities), *(f"RunActivity:{a}" for a in activities),
        "CompleteWorkflow:TopUpWorkflow"])

    # The request: the SERVER span at the root of the trace, with creditflow's request id and account.
    assert request.kind is SpanKind.SERVER and request.parent is None
    assert request.attributes is not None
    assert dict(request.attributes).items() >= {
        "http.request.method": "POST", "http.route": TOPUP, "url.path": TOPUP, "http.response.status_code": 200,
        "creditflow.request_id": request_id, "creditflow.account_id": account}.items()
    assert request.resource.attributes["service.name"] == "creditflow-test"

    # The client's update-with-start runs inside the endpoint; every worker-side span hangs under it (the
    # interceptor parents workflow spans to the context the client sent), each activity run under its start.
    start = _by_name(spans, "StartUpdateWithStartWorkflow:TopUpWorkflow")
    assert _ancestors(start, spans) == ["fastapi.endpoint", f"POST {TOPUP}"]
    assert start.attributes is not None
    assert start.attributes["temporalWorkflowID"] == topup_workflow_id(account, "order-1")
    for name in ("RunWorkflow:TopUpWorkflow", "ValidateUpdate:answer", "HandleUpdate:answer",
                 "CompleteWorkflow:TopUpWorkflow", *(f"StartActivity:{a}" for a in activities)):
        assert _ancestors(_by_name(spans, name), spans) == [start.name, "fastapi.endpoint", f"POST {TOPUP}"], name
    for activity in activities:
        ran = _by_name(spans, f"RunActivity:{activity}")
        assert _ancestors(ran, spans)[0] == f"StartActivity:{activity}"
        assert ran.kind is SpanKind.SERVER


@pytest.mark.temporal
async def test_a_callers_traceparent_is_the_parent_of_the_request_span(traced_api: httpx.AsyncClient) -> None:
    caller_trace = 0x0AF7651916CD43DD8448EB211C80319C
    caller_span = 0xB7AD6B7169203331
    resp = await traced_api.get("/api/v1/accounts", headers={
        "traceparent": f"00-{caller_trace:032x}-{caller_span:016x}-01"})
    assert resp.status_code == 200, resp.text
    span = _by_name(EXPORTER.get_finished_spans(), "GET /api/v1/accounts")
    assert span.context.trace_id == caller_trace
    assert span.parent is not None and span.parent.span_id == caller_span and span.parent.is_remote


def _run(script: str, **env: str) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT), **env})
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


# Profiles one warmed-up GET /healthz through ``app`` and prints where OpenTelemetry (or creditflow's tracing module)
# was entered from, as "caller function" names (calls inside OpenTelemetry itself are not counted again).
PROFILE_ONE_REQUEST = """
    import asyncio, collections, sys, httpx

    def entered_from(app):
        calls = collections.Counter()

        def profile(frame, event, arg):
            code = frame.f_code
            if event == "call" and ("/opentelemetry/" in code.co_filename
                                    or code.co_filename.endswith("creditflow/observability/tracing.py")):
                caller = frame.f_back.f_code
                if "/opentelemetry/" not in caller.co_filename:
                    calls[caller.co_name] += 1

        async def main():
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
                assert (await client.get("/healthz")).status_code == 200  # warm up: middleware stack built
                sys.setprofile(profile)
                resp = await client.get("/healthz")
                sys.setprofile(None)
                assert resp.status_code == 200

        asyncio.run(main())
        return dict(calls)
"""


def test_tracing_off_installs_nothing_and_adds_no_call_per_request() -> None:
    """The default: no tracer provider, the SDK never imported, no interceptor, no middleware; a request through
    the whole middleware stack enters OpenTelemetry only where FastAPI's routing always does (its per-operation
    check for request telemetry, 4 lookups of a context variable), never to look up providers or make spans."""
    out = _run(textwrap.dedent(PROFILE_ONE_REQUEST) + textwrap.dedent("""
        from opentelemetry import trace
        from creditflow.api.app import create_app
        from creditflow.config import Settings
        from creditflow.observability import tracing

        settings = Settings(database_url="postgresql://x@localhost/x")
        assert settings.otel_traces == "off"
        app = create_app(settings)
        assert tracing.temporal_interceptors(settings) == []
        assert tracing.configure_tracing(settings) is None
        assert not any(m.cls is tracing.RequestSpanMiddleware for m in app.user_middleware)
        print(entered_from(app), type(trace.get_tracer_provider()).__name__,
              any(m.startswith("opentelemetry.sdk") for m in sys.modules))
    """))
    assert out == "{'_get_request_telemetry': 4} ProxyTracerProvider False"


def test_fastapi_defaults_would_look_up_the_providers_on_every_request() -> None:
    """The measurement behind switching FastAPI's telemetry off when tracing is off: with its defaults the same
    request also asks OpenTelemetry for the global tracer, meter and logger providers, though none is set."""
    out = _run(textwrap.dedent(PROFILE_ONE_REQUEST) + textwrap.dedent("""
        from fastapi import FastAPI

        app = FastAPI()

        @app.get("/healthz")
        async def healthz():
            return {"status": "ok"}

        print(entered_from(app))
    """))
    assert out == "{'enabled': 3, '_get_request_telemetry': 4}", out


def test_otlp_without_its_exporter_package_says_what_to_install() -> None:
    """``otlp`` imports its exporter lazily; missing, start-up stops with the command that fixes it."""
    out = _run("""
        import sys
        sys.modules["opentelemetry.exporter.otlp.proto.http.trace_exporter"] = None  # as if not installed
        from creditflow.config import Settings
        from creditflow.observability.tracing import TracingNotAvailable, configure_tracing
        try:
            configure_tracing(Settings(otel_traces="otlp"))
        except TracingNotAvailable as err:
            print(err)
    """)
    assert out == ("CREDITFLOW_OTEL_TRACES=otlp needs the OTLP exporter: pip install 'creditflow[otel]' "
                   "(or pip install opentelemetry-exporter-otlp-proto-http)")


def test_otlp_exports_to_the_configured_endpoint() -> None:
    """``otlp``: spans are POSTed (OTLP/HTTP protobuf) to ``{otel_endpoint}/v1/traces`` with the service name."""
    out = _run("""
        import threading
        from http.server import BaseHTTPRequestHandler, HTTPServer
        from opentelemetry import trace
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
        from creditflow.config import Settings
        from creditflow.observability.tracing import configure_tracing

        received = []

        class Collector(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append((self.path, ExportTraceServiceRequest.FromString(body)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        server = HTTPServer(("127.0.0.1", 0), Collector)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        settings = Settings(otel_traces="otlp", otel_service_name="billing-api",
                            otel_endpoint=f"http://127.0.0.1:{server.server_port}/")
        provider = configure_tracing(settings)
        assert trace.get_tracer_provider() is provider
        with trace.get_tracer("t").start_as_current_span("hello"):
            pass
        provider.force_flush()
        [(path, request)] = received
        [resource] = request.resource_spans
        service = [a.value.string_value for a in resource.resource.attributes if a.key == "service.name"]
        print(path, service, [s.name for scope in resource.scope_spans for s in scope.spans])
        server.shutdown()
    """)
    assert out == "/v1/traces ['billing-api'] ['hello']"
