"""Signatures of customer webhooks: ``Creditflow-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256>``.

The HMAC key is the account's webhook secret (the whole ``whsec_...`` string, UTF-8) and the message is
``"{t}.".encode() + body`` with the exact body bytes sent. Signing the timestamp lets receivers refuse
replays of old deliveries; the receiver's check is documented in docs/concepts.md (a test runs that snippet).
"""

from __future__ import annotations

import hashlib
import hmac

SIGNATURE_HEADER = "Creditflow-Signature"


def signature(secret: str, timestamp: int, body: bytes) -> str:
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def signature_header(secret: str, timestamp: int, body: bytes) -> str:
    return f"t={timestamp},v1={signature(secret, timestamp, body)}"
