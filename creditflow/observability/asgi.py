"""The API's access log and request metrics: one pure ASGI middleware (no per-request task or body buffering,
the metering path goes through it).

It runs inside ``RequestIdMiddleware``, so every line has the request id. The route template (``/api/v1/...
/{hold_id}``), not the raw path, labels the metrics, so ids never explode their cardinality. A 4xx is a refusal
(INFO, no traceback: the error body already says why); a 5xx is logged at ERROR.
"""

from __future__ import annotations

import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from creditflow.observability import logs
from creditflow.observability.metrics import HTTP_LATENCY, HTTP_REQUESTS

log = logging.getLogger("creditflow.access")

# Not logged (probes and scrapes every few seconds), still counted.
QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


class AccessLogMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        token = logs.new_context()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope["method"]
            HTTP_REQUESTS.labels(method, template, str(status)).inc()
            HTTP_LATENCY.labels(method, template).observe(elapsed)
            if scope["path"] not in QUIET_PATHS or status >= 500:
                level = logging.ERROR if status >= 500 else logging.INFO
                log.log(level, "%s %s %d %.1fms", method, scope["path"], status, elapsed * 1000,
                        extra={"route": template, "status": status, "duration_ms": round(elapsed * 1000, 2)})
            logs.end_context(token)
