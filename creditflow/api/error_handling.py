"""One error object for every answer that is not a success, and the guards that keep input from causing a 5xx.

The object: ``{"error": {"code", "type", "message", "param", "details", "request_id"}}`` (see docs/api.md).
``UnexpectedErrorMiddleware`` turns whatever escapes a handler into that object, logged once with the request id:
a 503 with ``Retry-After`` when the database or Temporal is unreachable (retrying the same request is safe: every
write is idempotent), else a 500 ``internal_error``. ``InputGuardMiddleware`` refuses what no route can use
(a NUL character in the path or query, an oversized body) before any handler runs.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import unquote_to_bytes

import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from temporalio.client import RPCTimeoutOrCancelledError
from temporalio.service import RPCError

from creditflow.api.exact_json import BodyError, ExactJSONResponse, respond
from creditflow.api.request_context import current_request_id
from creditflow.errors import STATUS_BY_CODE, CreditflowError, error_type

log = logging.getLogger("creditflow.api")

RETRY_AFTER_SECONDS = 1
MAX_BODY_BYTES = 4 * 1024 * 1024  # a 1,000-event batch with metadata fits many times over
MAX_MESSAGE_CHARS = 500  # a message never echoes a huge input back


def error_object(code: str, message: str, *, status: int | None = None, details: object | None = None,
                 param: str | None = None) -> dict[str, Any]:
    """The ``error`` member of an error body (also the one a denied ``/track`` carries)."""
    status = status or STATUS_BY_CODE.get(code, 400)
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS] + "…"
    return {"code": code, "type": error_type(code, status), "message": message, "param": param,
            "details": details or {}, "request_id": current_request_id()}


def error_response(status: int, code: str, message: str, details: object | None = None,
                   param: str | None = None) -> ExactJSONResponse:
    response = respond({"error": error_object(code, message, status=status, details=details, param=param)}, status)
    if status == 503:
        response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return response


def infrastructure_fault(exc: BaseException) -> tuple[str, str] | None:
    """(code, message) when ``exc`` means the database or Temporal is unreachable: worth a retry later."""
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        return "database_unavailable", "the database is unavailable; retry the same request shortly"
    if isinstance(exc, RPCError | RPCTimeoutOrCancelledError):
        return "workflow_unavailable", "the workflow service is unavailable; retry the same request shortly"
    if isinstance(exc, ConnectionError | TimeoutError):
        return "service_unavailable", "a service this request needs is unavailable; retry shortly"
    return None


def _field(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc[1:]) or str(loc[0])


def _message(error: dict[str, Any]) -> str:
    """Pydantic's message, without its docs link; a JSON decode error says where and what."""
    if error.get("type") == "json_invalid":
        return f"not valid JSON: {error.get('ctx', {}).get('error', 'decode error')} at character {error['loc'][-1]}"
    return str(error["msg"]).removeprefix("Value error, ")[:MAX_MESSAGE_CHARS]


def install_error_handlers(app: FastAPI) -> None:
    """The handlers that give refusals the error object (the catch-all is ``UnexpectedErrorMiddleware``)."""

    @app.exception_handler(CreditflowError)
    async def creditflow_error(request: Request, exc: CreditflowError) -> ExactJSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.details, exc.param)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> ExactJSONResponse:
        problems = [{"field": _field(e["loc"]) if e.get("type") != "json_invalid" else "body",
                     "message": _message(e)} for e in exc.errors()]
        param = problems[0]["field"] if problems else None
        return error_response(422, "validation_error", "the request is not valid", {"problems": problems}, param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> ExactJSONResponse:
        if isinstance(exc, BodyError) and exc.code == "validation_error":
            return error_response(422, "validation_error", "the request is not valid",
                                  {"problems": [{"field": "body", "message": str(exc.detail)}]}, "body")
        code = getattr(exc, "code", None) or {404: "not_found", 405: "method_not_allowed", 401: "unauthorized",
                                              413: "request_too_large"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail))


async def _send_error(send: Send, response: ExactJSONResponse) -> None:
    await send({"type": "http.response.start", "status": response.status_code,
                "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


class UnexpectedErrorMiddleware:
    """Every exception a handler lets escape becomes the error object, logged once (never a bare text 500)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            fault = infrastructure_fault(exc)
            if fault is not None:
                log.warning("request %s %s: %s (%s: %s)", scope.get("method"), scope.get("path"), fault[0],
                            type(exc).__name__, exc, extra={"request_id": current_request_id()})
                response = error_response(503, fault[0], fault[1])
            else:
                log.exception("request %s %s failed", scope.get("method"), scope.get("path"),
                              extra={"request_id": current_request_id()})
                response = error_response(500, "internal_error", "an unexpected error occurred; it has been logged "
                                          "with this request_id")
            if started:  # the answer is half sent: nothing better to do than end the connection
                raise
            await _send_error(send, response)


class InputGuardMiddleware:
    """Refuse, before any handler, what no route can take: NUL (or undecodable) bytes in the path or query
    (PostgreSQL text cannot hold NUL), and bodies over ``MAX_BODY_BYTES`` (by Content-Length, or as they stream)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, query = scope.get("path", ""), scope.get("query_string", b"")
        if "\x00" in path or b"\x00" in unquote_to_bytes(query):
            where = "path" if "\x00" in path else "query"
            await _send_error(send, error_response(
                422, "validation_error", f"the {where} contains a NUL character",
                {"problems": [{"field": where, "message": "contains a NUL character"}]}, where))
            return
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            await _send_error(send, error_response(413, "request_too_large",
                                                   f"the body is larger than {MAX_BODY_BYTES} bytes"))
            return
        received = 0

        async def bounded_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > MAX_BODY_BYTES:
                    raise BodyError(f"the body is larger than {MAX_BODY_BYTES} bytes", "request_too_large", 413)
            return message

        await self.app(scope, bounded_receive, send)
