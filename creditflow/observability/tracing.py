"""OpenTelemetry traces, off unless configured: one trace from an API request to the workflow it starts and to
that workflow's activities (docs/operations.md, "Tracing").

``CREDITFLOW_OTEL_TRACES``: ``off`` (the default), ``console`` (spans printed to stdout) or ``otlp`` (to an
OpenTelemetry collector, ``CREDITFLOW_OTEL_ENDPOINT``; needs ``opentelemetry-exporter-otlp-proto-http``, in the
``otel`` extra). Off adds nothing: no middleware, no Temporal interceptor, the OpenTelemetry SDK is never
imported, and FastAPI's own telemetry is switched off (it would otherwise look up the global providers on every
request), so a request costs less than with FastAPI's defaults.

When on, one tracer provider per process (:func:`configure_tracing`) is handed explicitly to FastAPI's native
telemetry (a SERVER span per request, ``POST /api/v1/...{template}``, with method, route, status, and spans for
dependencies and the endpoint) and to the Temporal SDK's ``TracingInterceptor`` on every client made by
:func:`creditflow.client.connect_temporal`: starting a workflow, an update or a signal carries the trace context
in the Temporal headers, and a worker built on such a client (a client's interceptors apply to its workers)
adds the workflow and activity spans to the same trace. :class:`RequestSpanMiddleware` adds creditflow's request
id and account id to the request span. The provider is also installed as OpenTelemetry's global one, for any
other instrumented library in the process.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from creditflow.config import Settings
from creditflow.observability import logs

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

log = logging.getLogger(__name__)

TRACER_NAME = "creditflow"
_lock = threading.Lock()
_provider: TracerProvider | None = None


class TracingNotAvailable(RuntimeError):
    """Tracing is configured but its packages are not installed."""


def enabled(settings: Settings) -> bool:
    return settings.otel_traces != "off"


def _exporter(settings: Settings) -> SpanExporter:
    if settings.otel_traces == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter(service_name=settings.otel_service_name)
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as exc:
        raise TracingNotAvailable(
            "CREDITFLOW_OTEL_TRACES=otlp needs the OTLP exporter: pip install 'creditflow[otel]' "
            "(or pip install opentelemetry-exporter-otlp-proto-http)") from exc
    # Empty endpoint: the exporter's own default (OTEL_EXPORTER_OTLP_ENDPOINT, else http://localhost:4318).
    endpoint = settings.otel_endpoint.rstrip("/")
    return OTLPSpanExporter(endpoint=f"{endpoint}/v1/traces" if endpoint else None)


def configure_tracing(settings: Settings, exporter: SpanExporter | None = None, *,
                      set_global: bool = True) -> TracerProvider | None:
    """This process's tracer provider as the settings say, built once (later calls return the first); None when
    tracing is off. ``exporter`` replaces the one the settings name (tests: an in-memory exporter, with
    ``set_global=False`` so the rest of the test process stays untraced)."""
    global _provider
    if not enabled(settings):
        return None
    with _lock:
        if _provider is not None:
            return _provider
        try:
            from opentelemetry import trace
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        except ImportError as exc:
            raise TracingNotAvailable("CREDITFLOW_OTEL_TRACES needs the OpenTelemetry SDK: "
                                      "pip install 'creditflow[otel]'") from exc
        provider = TracerProvider(resource=Resource.create({"service.name": settings.otel_service_name}))
        # A given exporter (tests) sees each span as it ends; real exporters batch, off the request's path.
        processor = SimpleSpanProcessor if exporter is not None else BatchSpanProcessor
        provider.add_span_processor(processor(exporter or _exporter(settings)))
        if set_global:
            trace.set_tracer_provider(provider)
        _provider = provider
        log.info("tracing: %s spans as service %r", "custom" if exporter is not None else settings.otel_traces,
                 settings.otel_service_name)
        return provider


def fastapi_telemetry(settings: Settings) -> dict[str, Any]:
    """``FastAPI(telemetry=...)``: request spans from our provider when tracing is on; nothing at all when off.
    FastAPI's metrics and logs stay off either way (metrics are Prometheus', logs our own)."""
    provider = configure_tracing(settings)
    if provider is None:
        return {"tracing": False, "metrics": False, "logs": False}
    return {"tracer_provider": provider, "metrics": False, "logs": False, "auto_configure": False}


def temporal_interceptors(settings: Settings) -> list[Any]:
    """The Temporal client's interceptors: the SDK's OpenTelemetry one when tracing is on, else none."""
    provider = configure_tracing(settings)
    if provider is None:
        return []
    from temporalio.contrib.opentelemetry import TracingInterceptor

    return [TracingInterceptor(provider.get_tracer("temporalio.contrib.opentelemetry"))]


def install_middleware(app: Any, settings: Settings) -> None:
    """Add :class:`RequestSpanMiddleware` when tracing is on (nothing otherwise)."""
    if enabled(settings):
        app.add_middleware(RequestSpanMiddleware)


class RequestSpanMiddleware:
    """Adds ``creditflow.request_id`` and ``creditflow.account_id`` (the account the endpoint resolved) to
    FastAPI's request span, as the response starts (FastAPI ends the span with the response's last byte). A pure
    ASGI middleware inside the access log, whose log context holds the account id; added only when tracing is
    on."""

    def __init__(self, app: ASGIApp) -> None:
        from opentelemetry import trace

        self.app = app
        self._current_span = trace.get_current_span

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        span = self._current_span() if scope["type"] == "http" else None
        if span is None or not span.is_recording():
            await self.app(scope, receive, send)
            return

        async def send_with_ids(message: Message) -> None:
            if message["type"] == "http.response.start":
                request_id = scope.get("state", {}).get("request_id")
                if request_id:
                    span.set_attribute("creditflow.request_id", request_id)
                account_id = logs.context_fields().get("account_id")
                if account_id:
                    span.set_attribute("creditflow.account_id", account_id)
            await send(message)

        await self.app(scope, receive, send_with_ids)
