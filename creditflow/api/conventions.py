"""Stripe-style request conventions: the ``Idempotency-Key`` header and the dated ``Creditflow-Version`` header.

``Idempotency-Key`` works on every POST that creates or moves something (track, holds, event, manual credits,
top-ups, refunds). The body fields that did this job before (``idempotency_key``, ``request_id``) keep working as
aliases; when both are given they must agree (``idempotency_key_mismatch``, 400). Replays and conflicts are the
ledger's and the workflows' own: same key and same request, the stored answer; same key and another request,
``idempotency_conflict`` (409).

``Creditflow-Version`` names the API version a client was written against (a date). Absent, the default one
applies; an unknown one is refused (``unsupported_version``, 400) rather than guessed; every response echoes the
version it was answered in. Versions: ``2026-12-01`` (the default: amounts are exact JSON numbers) and
``2026-12-05`` (amounts are decimal strings, for clients that want no number decoding; ``exact_json``). Requests
accept numbers and strings in every version.
"""

from __future__ import annotations

from typing import Annotated, TypeVar

from fastapi import Header, Query
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from creditflow.api.error_handling import error_response
from creditflow.api.exact_json import DECIMAL_STRINGS
from creditflow.errors import CreditflowError
from creditflow.ids import check_token
from creditflow.ledger.pagination import Cursor

T = TypeVar("T")

DEFAULT_VERSION = "2026-12-01"
CURRENT_VERSION = DEFAULT_VERSION  # the name before there were two: the version answered without the header
DECIMAL_STRINGS_VERSION = "2026-12-05"
SUPPORTED_VERSIONS = (DEFAULT_VERSION, DECIMAL_STRINGS_VERSION)
VERSION_HEADER = b"creditflow-version"

IdempotencyKey = Annotated[str | None, Header(
    alias="Idempotency-Key", description="Makes the request safe to retry: the same key and request get the "
    "stored answer, the same key with another request a 409 idempotency_conflict. Alias of the body field.")]


def idempotency_key(header: str | None, body: str | None, field: str = "idempotency_key") -> str:
    """The request's key: the header, the body field, or both when they agree."""
    if header is not None:
        try:
            check_token(header, "Idempotency-Key")
        except CreditflowError as exc:
            raise CreditflowError("validation_error", exc.message, param="Idempotency-Key") from exc
        if body is not None and body != header:
            raise CreditflowError("idempotency_key_mismatch",
                                  f"the Idempotency-Key header and the body's {field} differ; send one, or the same",
                                  param=field)
        return header
    if body is None:
        raise CreditflowError("validation_error", f"an idempotency key is required: the Idempotency-Key header "
                              f"(or {field} in the body)", param=field,
                              details={"problems": [{"field": field, "message": "Field required"}]})
    return body


class VersionMiddleware:
    """Check ``Creditflow-Version`` and echo the version answered in on every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope["headers"] if k == VERSION_HEADER), None)
        version = given.decode("latin-1").strip() if given is not None else DEFAULT_VERSION
        raw = version.encode("latin-1") if version in SUPPORTED_VERSIONS else DEFAULT_VERSION.encode()
        scope.setdefault("state", {})["api_version"] = raw.decode()

        async def send_with_version(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (VERSION_HEADER, raw)]
            await send(message)

        if version not in SUPPORTED_VERSIONS:
            response = error_response(400, "unsupported_version", f"unknown Creditflow-Version {version[:40]!r}; "
                                      f"supported: {', '.join(SUPPORTED_VERSIONS)}", param="Creditflow-Version")
            await send_with_version({"type": "http.response.start", "status": 400, "headers": response.raw_headers})
            await send({"type": "http.response.body", "body": response.body})
            return
        token = DECIMAL_STRINGS.set(version == DECIMAL_STRINGS_VERSION)
        try:
            await self.app(scope, receive, send_with_version)
        finally:
            DECIMAL_STRINGS.reset(token)


def api_version() -> str:
    """The version the current request is answered in."""
    return DECIMAL_STRINGS_VERSION if DECIMAL_STRINGS.get() else DEFAULT_VERSION


_ITEM_ID = r"^[a-z]+_[0-9a-f]{32}$"
StartingAfter = Annotated[str | None, Query(pattern=_ITEM_ID, description="Cursor: the page after (older than) "
                                            "this item id, newest first.")]
EndingBefore = Annotated[str | None, Query(pattern=_ITEM_ID, description="Cursor: the page before (newer than) "
                                           "this item id.")]


def page_of(rows: list[T], limit: int, cursor: Cursor) -> tuple[list[T], bool]:
    """The page of ``rows`` (fetched with ``limit + 1``, newest first) and ``has_more`` (more in that direction)."""
    if len(rows) <= limit:
        return rows, False
    return (rows[-limit:] if cursor.ending_before is not None else rows[:limit]), True
