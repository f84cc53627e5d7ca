"""Request fingerprints for idempotency keys: same key + same request = same result."""

from __future__ import annotations

import hashlib
from decimal import Decimal

import simplejson


def request_hash(operation: str, **fields: object) -> str:
    """A stable hash of the operation and its normalized fields (Decimals by value, not text)."""

    def norm(value: object) -> object:
        if isinstance(value, Decimal):
            return str(value.normalize()) if value != value.to_integral_value() else str(int(value))
        if isinstance(value, dict):
            return {k: norm(v) for k, v in sorted(value.items())}
        if isinstance(value, list | tuple):
            return [norm(v) for v in value]
        return value

    payload = simplejson.dumps({"op": operation, **{k: norm(v) for k, v in fields.items()}},
                               sort_keys=True, separators=(",", ":"), use_decimal=True)
    return hashlib.sha256(payload.encode()).hexdigest()
