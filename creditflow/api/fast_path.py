"""The metering routes without FastAPI's per-request dependency solving (issue 16 §3).

Profiled on the ASGI app, FastAPI's ``solve_dependencies`` was about a third of the API's CPU per ``track``
request: the bearer scheme, the principal, the scope check, the pool and the body, each a dependency resolved
again per request. A fast path does the same steps directly (the same functions: ``principal_of``,
``check_scope``, the route's own pydantic model) and calls the same endpoint function, so a request it accepts
gets the answer the route gives.

It only ever *accepts*: at the first thing that is not the plain case (no bearer key, an unknown or revoked key, a
missing scope, a content type FastAPI would not read as JSON, a body that fails validation), it answers nothing
and the regular FastAPI route handles the request from the start, with its own error (the body already read is
kept on the request). Errors raised by the endpoint itself (a forbidden account, a mismatched Idempotency-Key)
propagate as they do from the regular route. The OpenAPI document is the route's, unchanged.
"""

from __future__ import annotations

import email.message
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import HTTPException, Request, Response
from fastapi.security.utils import get_authorization_scheme_param
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel

from creditflow.api.deps import check_scope, principal_of
from creditflow.api.keys import Principal
from creditflow.errors import CreditflowError

M = TypeVar("M", bound=BaseModel)
FastPath = Callable[[Request], Awaitable[Response | None]]
Call = Callable[[Any, Principal, AsyncConnectionPool, Request], Awaitable[Response]]

# What the fast path leaves to the regular route (which then answers with its error): refusals, bodies that are
# not JSON (json.JSONDecodeError, a ValueError, which FastAPI answers as a validation error), invalid bodies
# (pydantic's ValidationError is a ValueError too) and unusable ones (BodyError, an HTTPException).
_DECLINED = (CreditflowError, ValueError, HTTPException)


def _read_as_json(content_type: str | None) -> bool:
    """FastAPI's rule for reading a body as JSON: no content type, or application/json or application/*+json."""
    if not content_type:
        return True
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))


def body_route(model: type[M], call: Call) -> FastPath:
    """A fast path for a route whose parameters are one JSON body (``model``), the caller and the pool."""

    async def fast(request: Request) -> Response | None:
        if not _read_as_json(request.headers.get("content-type")):
            return None
        scheme, secret = get_authorization_scheme_param(request.headers.get("authorization"))
        if scheme.lower() != "bearer" or not secret:
            return None
        try:
            principal = await principal_of(request, secret)
            check_scope(principal, request.method,
                        getattr(request.scope.get("route"), "path_format", request.url.path))
            body = model.model_validate(await request.json())
        except _DECLINED:
            return None
        return await call(body, principal, request.app.state.pool, request)

    return fast


def attach(endpoint: Callable[..., Any], fast: FastPath) -> None:
    """Give a route's endpoint its fast path (``ExactRoute`` tries it first)."""
    endpoint.fast_path = fast  # type: ignore[attr-defined]
