"""Resource ids: a readable prefix and 32 hex digits (``acc_3f2a...``). Malformed ids are refused early."""

from __future__ import annotations

import re
import uuid

from creditflow.errors import CreditflowError

_ID = re.compile(r"^(?P<prefix>[a-z]+)_[0-9a-f]{32}$")
# Caller-chosen ids (agents, idempotency keys, external ids): printable, bounded.
_TOKEN = re.compile(r"^[A-Za-z0-9._:\-/]{1,200}$")


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def check_id(value: str, prefix: str, what: str = "id") -> str:
    match = _ID.match(value or "")
    if not match or match["prefix"] != prefix:
        raise CreditflowError("invalid_id", f"malformed {what}: expected {prefix}_<32 hex digits>", param=what)
    return value


def check_token(value: str, what: str) -> str:
    if not _TOKEN.match(value or ""):
        raise CreditflowError("validation_error",
                              f"{what} must be 1-200 characters of letters, digits and . _ : - /")
    return value
