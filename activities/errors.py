"""Activity errors: creditflow refusals become typed ``ApplicationError``s, non-retryable unless the
code names a transient condition, so workflows and their retry policies can tell them apart."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

from temporalio.exceptions import ApplicationError

from creditflow.errors import CreditflowError

# Codes worth retrying (the gateway already retried a few times with backoff); every other code is final.
RETRYABLE_CODES = frozenset({"payment_provider_unavailable"})

P = ParamSpec("P")
R = TypeVar("R")


def application_error(exc: CreditflowError) -> ApplicationError:
    return ApplicationError(exc.message, exc.details, type=exc.code, non_retryable=exc.code not in RETRYABLE_CODES)


def translating_errors(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Wrap an activity so a ``CreditflowError`` leaves it as the matching ``ApplicationError``."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except CreditflowError as exc:
            raise application_error(exc) from exc

    return wrapper
