"""TEST-ONLY fault injection (tests/test_fault_injection.py): with ``CREDITFLOW_FAULT_INJECT`` set to a point's name
the worker process SIGKILLs itself there, to prove a crash at that point is recovered exactly once. Unset (always,
outside those tests) it does nothing. Never set it in any deployed environment.

Points: ``after_charge`` / ``after_credit`` (top-ups), ``renewal_after_expiry`` (billing cycle)."""

from __future__ import annotations

import os
import signal

FAULT_INJECT_ENV = "CREDITFLOW_FAULT_INJECT"


def fault_point(name: str) -> None:
    """Kill this process (no cleanup, as a crash would) if ``name`` is the injected fault."""
    if os.environ.get(FAULT_INJECT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
