"""Request fingerprints for idempotency keys: same key + same request = same result.

A 16-byte BLAKE2b digest of a canonical text form; cheap enough for the metering hot path."""

from __future__ import annotations

import hashlib
import json
from decimal import Decimal


def canonical_decimal(value: Decimal) -> str:
    """``2.50``, ``2.5`` and ``25E-1`` are the same request. Exact for any finite Decimal: no
    rounding context is involved."""
    if value == value.to_integral_value():
        return str(int(value))  # exact for any finite Decimal (no rounding context involved)
    sign, digits, exponent = value.as_tuple()
    if not isinstance(exponent, int):
        return str(value)  # NaN/Infinity never reach a fingerprint, but stay deterministic anyway
    numerals = list(digits)
    if not any(numerals):
        return "0"
    while len(numerals) > 1 and numerals[-1] == 0:
        numerals.pop()
        exponent += 1
    return f"{'-' if sign else ''}{''.join(map(str, numerals))}e{exponent}"


def _default(value: object) -> str:
    if isinstance(value, Decimal):
        return canonical_decimal(value)
    return str(value)


def request_hash(operation: str, *parts: object, metadata: dict[str, object] | None = None) -> bytes:
    items = [operation]
    for part in parts:
        items.append("\x00" if part is None else canonical_decimal(part) if isinstance(part, Decimal) else str(part))
    if metadata:
        items.append(json.dumps(metadata, sort_keys=True, separators=(",", ":"), default=_default))
    return hashlib.blake2b("\x1f".join(items).encode(), digest_size=16).digest()
