"""A typed Python client for creditflow's HTTP API (``creditflow.client`` is the Temporal client; this is HTTP).

    from creditflow.sdk import Creditflow

    cf = Creditflow("cf_sk_...", base_url="https://billing.example.com")
    result = cf.track("chat_message", 1, idempotency_key="msg-42")
    if not result.allowed: ...                     # a denial is a result, not an exception
    cf.check("voice_minute", 3).allowed
    cf.balance().available
    cf.topup(package_id="starter", idempotency_key="order-7").status

Amounts are ``Decimal``: the API sends exact JSON numbers, decoded here without floats; or, with
``version=DECIMAL_STRINGS_VERSION``, decimal strings (no number decoding at all). Refusals raise
:class:`ApiError` with the error object's fields. A 503 (database or Temporal unreachable) is retried after its
``Retry-After`` with the same ``Idempotency-Key``, which the API makes safe; other errors are not retried.
``AsyncCreditflow`` is the same for asyncio. Each method names the OpenAPI operation it calls (``operation_id``);
a test checks them against the served document.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field, fields
from decimal import Decimal
from typing import Any, TypeVar

import httpx

API_VERSION = "2026-12-01"  # amounts are exact JSON numbers (the API's default)
DECIMAL_STRINGS_VERSION = "2026-12-05"  # amounts are decimal strings
DEFAULT_BASE_URL = "http://127.0.0.1:8000"
T = TypeVar("T")


class ApiError(Exception):
    """The API's error object: branch on ``code`` (stable) or ``type`` (the family)."""

    def __init__(self, status: int, error: dict[str, Any], retry_after: float | None = None) -> None:
        self.status = status
        self.code: str = error.get("code", "http_error")
        self.type: str = error.get("type", "api_error")
        self.message: str = error.get("message", "")
        self.param: str | None = error.get("param")
        self.details: dict[str, Any] = error.get("details") or {}
        self.request_id: str | None = error.get("request_id")
        self.retry_after = retry_after
        super().__init__(f"{status} {self.code}: {self.message} (request {self.request_id})")


def _amount(value: Any) -> Any:
    """A ``Decimal`` field's value as a Decimal, whether the version answered a number (``12.5``, ``45230``) or a
    decimal string (``"12.5"``)."""
    if isinstance(value, int | str) and not isinstance(value, bool):
        return Decimal(value)
    return value


def _build(cls: type[T], data: dict[str, Any]) -> T:
    """A result dataclass from an answer; fields the client does not know are kept in ``extra``."""
    amounts = {f.name for f in fields(cls) if "Decimal" in str(f.type)}  # type: ignore[arg-type]
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    kwargs = {k: _amount(v) if k in amounts else v for k, v in data.items() if k in known and k != "extra"}
    return cls(**kwargs, extra={k: v for k, v in data.items() if k not in known})


@dataclass(frozen=True)
class TrackResult:
    """``POST /api/v1/billing/track`` (operation ``billing.track``). ``error`` is set when ``allowed`` is false."""

    allowed: bool
    code: str
    credits_charged: Decimal
    credits_per_unit: Decimal | None = None
    credits_required: Decimal | None = None
    balance: Decimal | None = None
    pending_charges: Decimal | None = None
    available: Decimal | None = None
    transaction_id: str | None = None
    replayed: bool = False
    error: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckResult:
    """``POST /api/v1/billing/check`` (operation ``billing.check``)."""

    allowed: bool
    code: str
    feature_id: str
    credits_required: Decimal | None = None
    credits_per_unit: Decimal | None = None
    balances: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Balance:
    """``GET /api/v1/billing/balance`` (operation ``billing.balance``)."""

    account_id: str
    balance: Decimal
    pending_charges: Decimal
    available: Decimal
    available_to_use: Decimal
    overage_credit_line: Decimal = Decimal(0)
    currency: str = "credits"
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TopUp:
    """``POST /api/v1/billing/wallet/topup`` (operation ``top_ups.topup``): ``succeeded``, ``requires_payment``
    (confirm ``client_secret`` in the browser) or ``pending`` (repeat with the same key for the answer)."""

    status: str
    request_id: str
    amount_usd: Decimal | None = None
    credits: int | None = None
    transaction_id: str | None = None
    balance: Decimal | None = None
    payment_intent_id: str | None = None
    client_secret: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# (method, path, operation id) of each call: checked against /openapi.json by the tests.
OPERATIONS = {
    "track": ("POST", "/api/v1/billing/track", "billing.track"),
    "check": ("POST", "/api/v1/billing/check", "billing.check"),
    "balance": ("GET", "/api/v1/billing/balance", "billing.balance"),
    "topup": ("POST", "/api/v1/billing/wallet/topup", "top_ups.topup"),
}
_ALLOWED_DENIALS = {"track"}  # a usage denial (no credits, a limit) is an answer (allowed: false), not an exception


def _clean(body: dict[str, Any]) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Decimal) else v) for k, v in body.items() if v is not None}


class _Base:
    def __init__(self, api_key: str, base_url: str, version: str, max_retries: int) -> None:
        self._headers = {"Authorization": f"Bearer {api_key}", "Creditflow-Version": version,
                         "User-Agent": "creditflow-sdk"}
        self._base_url = base_url.rstrip("/")
        self._max_retries = max_retries

    def _prepare(self, name: str, body: dict[str, Any] | None, params: dict[str, Any] | None,
                 idempotency_key: str | None) -> dict[str, Any]:
        method, path, _ = OPERATIONS[name]
        headers = dict(self._headers)
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        request: dict[str, Any] = {"method": method, "url": self._base_url + path, "headers": headers}
        if body is not None:
            request["json"] = _clean(body)
        if params:
            request["params"] = {k: v for k, v in params.items() if v is not None}
        return request

    @staticmethod
    def _parse(name: str, response: httpx.Response) -> tuple[dict[str, Any] | None, ApiError | None]:
        try:
            data = json.loads(response.content, parse_float=Decimal) if response.content else {}
        except ValueError:
            data = {"error": {"code": "http_error", "message": response.text[:200]}}
        denial = isinstance(data, dict) and (data.get("error") or {}).get("type") == "usage_denied"
        if response.status_code < 400 or (name in _ALLOWED_DENIALS and denial):
            return data, None
        retry_after = response.headers.get("retry-after")
        error = data.get("error") if isinstance(data, dict) else None
        return None, ApiError(response.status_code, error or {"code": "http_error"},
                              float(retry_after) if retry_after and retry_after.isdigit() else None)

    def _retryable(self, error: ApiError, attempt: int) -> bool:
        return error.status == 503 and attempt < self._max_retries


class Creditflow(_Base):
    """Synchronous client (``httpx.Client``)."""

    def __init__(self, api_key: str, base_url: str = DEFAULT_BASE_URL, *, version: str = API_VERSION,
                 timeout: float = 60.0, max_retries: int = 2, transport: httpx.BaseTransport | None = None) -> None:
        super().__init__(api_key, base_url, version, max_retries)
        self._http = httpx.Client(timeout=timeout, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Creditflow:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, name: str, body: dict[str, Any] | None = None, params: dict[str, Any] | None = None,
              idempotency_key: str | None = None) -> dict[str, Any]:
        request = self._prepare(name, body, params, idempotency_key)
        attempt = 0
        while True:
            data, error = self._parse(name, self._http.request(**request))
            if error is None:
                assert data is not None
                return data
            if not self._retryable(error, attempt):
                raise error
            attempt += 1
            time.sleep(error.retry_after or 1)

    def track(self, feature_id: str, value: Decimal | int | str, *, idempotency_key: str,
              agent_id: str | None = None, metadata: dict[str, Any] | None = None,
              account_id: str | None = None) -> TrackResult:
        return _build(TrackResult, self._call("track", {"account_id": account_id, "feature_id": feature_id,
                                                        "value": value, "agent_id": agent_id,
                                                        "metadata": metadata}, idempotency_key=idempotency_key))

    def check(self, feature_id: str, value: Decimal | int | str | None = None, *, agent_id: str | None = None,
              account_id: str | None = None) -> CheckResult:
        return _build(CheckResult, self._call("check", {"account_id": account_id, "feature_id": feature_id,
                                                        "value": value, "agent_id": agent_id}))

    def balance(self, account_id: str | None = None) -> Balance:
        return _build(Balance, self._call("balance", params={"account_id": account_id}))

    def topup(self, amount_usd: Decimal | int | str | None = None, *, package_id: str | None = None,
              idempotency_key: str, payment_method_id: str | None = None, account_id: str | None = None) -> TopUp:
        return _build(TopUp, self._call("topup", {"account_id": account_id, "amount_usd": amount_usd,
                                                  "package_id": package_id, "payment_method_id": payment_method_id},
                                        idempotency_key=idempotency_key))


class AsyncCreditflow(_Base):
    """The same client for asyncio (``httpx.AsyncClient``)."""

    def __init__(self, api_key: str, base_url: str = DEFAULT_BASE_URL, *, version: str = API_VERSION,
                 timeout: float = 60.0, max_retries: int = 2,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        super().__init__(api_key, base_url, version, max_retries)
        self._http = httpx.AsyncClient(timeout=timeout, transport=transport)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncCreditflow:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _call(self, name: str, body: dict[str, Any] | None = None, params: dict[str, Any] | None = None,
                    idempotency_key: str | None = None) -> dict[str, Any]:
        request = self._prepare(name, body, params, idempotency_key)
        attempt = 0
        while True:
            data, error = self._parse(name, await self._http.request(**request))
            if error is None:
                assert data is not None
                return data
            if not self._retryable(error, attempt):
                raise error
            attempt += 1
            await asyncio.sleep(error.retry_after or 1)

    async def track(self, feature_id: str, value: Decimal | int | str, *, idempotency_key: str,
                    agent_id: str | None = None, metadata: dict[str, Any] | None = None,
                    account_id: str | None = None) -> TrackResult:
        return _build(TrackResult, await self._call("track", {
            "account_id": account_id, "feature_id": feature_id, "value": value, "agent_id": agent_id,
            "metadata": metadata}, idempotency_key=idempotency_key))

    async def check(self, feature_id: str, value: Decimal | int | str | None = None, *, agent_id: str | None = None,
                    account_id: str | None = None) -> CheckResult:
        return _build(CheckResult, await self._call("check", {"account_id": account_id, "feature_id": feature_id,
                                                              "value": value, "agent_id": agent_id}))

    async def balance(self, account_id: str | None = None) -> Balance:
        return _build(Balance, await self._call("balance", params={"account_id": account_id}))

    async def topup(self, amount_usd: Decimal | int | str | None = None, *, package_id: str | None = None,
                    idempotency_key: str, payment_method_id: str | None = None,
                    account_id: str | None = None) -> TopUp:
        return _build(TopUp, await self._call("topup", {
            "account_id": account_id, "amount_usd": amount_usd, "package_id": package_id,
            "payment_method_id": payment_method_id}, idempotency_key=idempotency_key))
