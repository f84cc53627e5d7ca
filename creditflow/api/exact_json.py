"""Exact amounts over JSON, both ways.

Convention (documented in docs/concepts.md, "Exact money"): every credit amount is a JSON **number** written exactly
from a Decimal: whole amounts as integers (``45230``), sub-credit amounts with their exact digits
(``0.5``, ``4999.9``). Requests are parsed the same way (JSON numbers become Decimals, never
floats), and decimal strings (``"2.5"``) are accepted too.

A client that wants no number decoding at all asks for API version ``2026-12-05`` (``Creditflow-Version``,
docs/api.md): then every amount (every Decimal of the answer) is a decimal **string** with the same digits
(``"45230"``, ``"0.5"``). Integer fields (micros, cents, counts) stay integers and customer metadata is
returned as it was given, in every version.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from contextvars import ContextVar
from datetime import date, datetime
from decimal import Decimal
from enum import Enum
from typing import Any

import simplejson
from fastapi import HTTPException, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel

# Set per request from the Creditflow-Version header (conventions.VersionMiddleware): amounts as decimal strings.
DECIMAL_STRINGS: ContextVar[bool] = ContextVar("creditflow_decimal_strings", default=False)
# Free-form data a customer stored: returned as given, never reformatted by the version.
_AS_GIVEN = frozenset({"metadata"})


def exact_number(value: Decimal) -> int | Decimal:
    """The exact JSON number of an amount: whole amounts as integers, others with their significant digits."""
    return int(value) if value == value.to_integral_value() else value.normalize()


def decimal_string(value: Decimal) -> str:
    """The amount as a decimal string with the digits its number would have (no exponent): ``"2500"``, ``"0.5"``."""
    number = exact_number(value)
    return str(number) if isinstance(number, int) else format(number, "f")


def _normalize(value: Any, strings: bool = False) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, Decimal):
        return decimal_string(value) if strings else exact_number(value)
    if isinstance(value, BaseModel):
        return _normalize(value.model_dump(mode="python"), strings)
    if isinstance(value, dict):
        return {k: _normalize(v, strings and k not in _AS_GIVEN) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_normalize(v, strings) for v in value]
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Enum):
        return value.value
    return value


class ExactJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return simplejson.dumps(_normalize(content, DECIMAL_STRINGS.get()), use_decimal=True, ensure_ascii=False,
                                separators=(",", ":")).encode()


def respond(content: Any, status_code: int = 200) -> ExactJSONResponse:
    return ExactJSONResponse(content=content, status_code=status_code)


class BodyError(HTTPException):
    """A request body that is not usable (raised while reading or parsing it, before validation): like malformed
    JSON, a ``validation_error`` naming the body; or ``request_too_large``."""

    def __init__(self, message: str, code: str = "validation_error", status: int = 422) -> None:
        super().__init__(status, message)
        self.code = code


MAX_NUMBER_CHARS = 60  # no amount, quantity or id needs more; Python refuses ints over 4,300 digits anyway
MAX_DEPTH = 32


def _number(text: str) -> Decimal:
    if len(text) > MAX_NUMBER_CHARS:
        raise BodyError(f"a number in the body has more than {MAX_NUMBER_CHARS} characters")
    return Decimal(text)


def _integer(text: str) -> int:
    if len(text) > MAX_NUMBER_CHARS:
        raise BodyError(f"a number in the body has more than {MAX_NUMBER_CHARS} characters")
    return int(text)


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Duplicate keys are refused: which one wins is parser-dependent, so the request is ambiguous."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise BodyError(f"the key {key[:100]!r} appears twice in one object")
        result[key] = value
    return result


def _check_strings(value: Any, depth: int = 0) -> None:
    """No NUL characters (PostgreSQL text cannot hold them) or lone surrogates anywhere; bounded nesting."""
    if depth > MAX_DEPTH:
        raise BodyError(f"the body is nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, str):
        if "\x00" in value:
            raise BodyError("a string in the body contains a NUL character")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise BodyError("a string in the body is not valid Unicode (a lone surrogate)") from exc
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_strings(key, depth + 1)
            _check_strings(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_strings(item, depth + 1)


class ExactRequest(Request):
    """Parses JSON bodies with Decimal numbers so ``0.1`` stays exactly 0.1, refusing what no route can use:
    duplicate keys, numbers longer than any amount, deep nesting, NUL characters and lone surrogates."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            try:
                parsed = json.loads(await self.body(), parse_float=_number, parse_int=_integer,
                                    parse_constant=_constant, object_pairs_hook=_object)
            except RecursionError as exc:
                raise BodyError(f"the body is nested deeper than {MAX_DEPTH} levels") from exc
            except UnicodeDecodeError as exc:
                raise BodyError("the body is not UTF-8") from exc
            _check_strings(parsed)
            self._json = parsed
        return self._json


def _constant(name: str) -> Any:
    raise BodyError(f"{name} is not a JSON number")


class ExactRoute(APIRoute):
    """Routes whose bodies are read exactly (``ExactRequest``). An endpoint with a ``fast_path``
    (creditflow/api/fast_path.py) is offered the request first; when it declines, the regular handler answers,
    on the same request object (so a body already read is read from memory)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def exact_handler(request: Request) -> Response:
            exact = ExactRequest(request.scope, request.receive)
            fast = getattr(self.endpoint, "fast_path", None)
            if fast is not None:
                response = await fast(exact)
                if response is not None:
                    return response
            return await handler(exact)

        return exact_handler
