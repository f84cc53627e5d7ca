"""Caller metadata and free text: stored as given and echoed back, so checked first that it can
neither break the database (NUL bytes, lone surrogates, NaN) nor grow without bound."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from creditflow.errors import CreditflowError

MAX_DEPTH = 5
MAX_ITEMS = 200
MAX_STRING = 2000
MAX_KEY = 100
MAX_EXPONENT = 30  # |adjusted exponent| of a number: enough for any real quantity, small to hash


def check_text(value: str, what: str = "text") -> str:
    """Refuse what PostgreSQL text cannot hold (NUL) and what UTF-8 cannot encode (lone surrogates)."""
    if "\x00" in value:
        raise CreditflowError("validation_error", f"{what} contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise CreditflowError("validation_error", f"{what} is not valid Unicode") from exc
    return value


def check_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """JSON objects of strings, finite numbers, booleans, nulls, lists and objects; bounded."""
    count = 0

    def walk(value: Any, depth: int, where: str) -> None:
        nonlocal count
        count += 1
        if count > MAX_ITEMS:
            raise CreditflowError("validation_error", f"metadata has more than {MAX_ITEMS} values")
        if depth > MAX_DEPTH:
            raise CreditflowError("validation_error", f"metadata is nested deeper than {MAX_DEPTH} levels")
        if value is None or isinstance(value, bool):
            return
        if isinstance(value, int):
            if abs(value) >= 10**MAX_EXPONENT:
                raise CreditflowError("validation_error", f"metadata number at {where} is too large")
            return
        if isinstance(value, Decimal):
            if not value.is_finite() or abs(value.adjusted()) > MAX_EXPONENT:
                raise CreditflowError("validation_error", f"metadata number at {where} is not a finite, sane number")
            return
        if isinstance(value, float):  # JSON numbers arrive as Decimal; a float here is NaN or Infinity
            raise CreditflowError("validation_error", f"metadata at {where} is not a finite number")
        if isinstance(value, str):
            if len(value) > MAX_STRING:
                raise CreditflowError("validation_error", f"metadata string at {where} is too long")
            check_text(value, f"metadata at {where}")
            return
        if isinstance(value, list):
            for i, item in enumerate(value):
                walk(item, depth + 1, f"{where}[{i}]")
            return
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str) or not key or len(key) > MAX_KEY:
                    raise CreditflowError("validation_error", f"metadata keys must be 1-{MAX_KEY} characters")
                check_text(key, "a metadata key")
                walk(item, depth + 1, f"{where}.{key}")
            return
        raise CreditflowError("validation_error", f"metadata at {where} is not a JSON value")

    if not isinstance(metadata, dict):
        raise CreditflowError("validation_error", "metadata must be a JSON object")
    walk(metadata, 0, "metadata")
    return metadata
