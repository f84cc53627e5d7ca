"""Exact amounts over JSON, both ways.

Convention (documented in the README): every credit amount is a JSON **number** written exactly
from a Decimal: whole amounts as integers (``45230``), sub-credit amounts with their exact digits
(``0.5``, ``4999.9``). Requests are parsed the same way (JSON numbers become Decimals, never
floats), and decimal strings (``"2.5"``) are accepted too.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from datetime import date, datetime
from decimal import Decimal
from enum import Enum
from typing import Any

import simplejson
from fastapi import Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel


def _normalize(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else value.normalize()
    if isinstance(value, BaseModel):
        return _normalize(value.model_dump(mode="python"))
    if isinstance(value, dict):
        return {k: _normalize(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_normalize(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Enum):
        return value.value
    return value


class ExactJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return simplejson.dumps(_normalize(content), use_decimal=True, ensure_ascii=False,
                                separators=(",", ":")).encode()


def respond(content: Any, status_code: int = 200) -> ExactJSONResponse:
    return ExactJSONResponse(content=content, status_code=status_code)


class ExactRequest(Request):
    """Parses JSON bodies with Decimal numbers so ``0.1`` stays exactly 0.1."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = json.loads(await self.body(), parse_float=Decimal)
        return self._json


class ExactRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def exact_handler(request: Request) -> Response:
            return await handler(ExactRequest(request.scope, request.receive))

        return exact_handler
