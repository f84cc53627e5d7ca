"""The request id: one per HTTP request, in every error body, log line and response header.

A pure ASGI middleware (no per-request task or body buffering: the metering path goes through it)
sets a context variable that error handlers, logs and metrics read, and echoes ``X-Request-Id``.
A caller's own ``X-Request-Id`` is kept when it is a short printable token, so a platform can
follow its id through creditflow's logs; anything else is replaced by a generated ``req_...`` id.
"""

from __future__ import annotations

import re
import secrets
from contextvars import ContextVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = b"x-request-id"
_ACCEPTED = re.compile(rb"^[A-Za-z0-9._:\-]{1,128}$")

request_id_var: ContextVar[str | None] = ContextVar("creditflow_request_id", default=None)


def new_request_id() -> str:
    return "req_" + secrets.token_hex(12)


def current_request_id() -> str | None:
    """The id of the HTTP request being served (None outside a request)."""
    return request_id_var.get()


class RequestIdMiddleware:
    """Give every request an id and answer it in ``X-Request-Id``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope["headers"] if k == HEADER), None)
        rid = given.decode("ascii") if given is not None and _ACCEPTED.match(given) else new_request_id()
        token = request_id_var.set(rid)
        scope.setdefault("state", {})["request_id"] = rid
        raw = rid.encode("ascii")

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (HEADER, raw)]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)
