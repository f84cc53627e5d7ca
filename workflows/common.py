"""Pieces every creditflow workflow uses: activity timeouts, retry policies and error unwrapping.

Pure (no I/O at import) so workflows can import it inside the sandbox.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

from workflows.contract import SA_ACCOUNT_ID, SA_STATUS

DB_TIMEOUT = timedelta(seconds=30)
STRIPE_TIMEOUT = timedelta(minutes=3)


def db_retry(refusals: Sequence[str]) -> RetryPolicy:
    """Our database: short outages are retried for a few minutes, refusals (``refusals``) never."""
    return RetryPolicy(initial_interval=timedelta(seconds=1), backoff_coefficient=2.0,
                       maximum_interval=timedelta(seconds=30), maximum_attempts=10,
                       non_retryable_error_types=list(refusals))


def until_done_retry(refusals: Sequence[str]) -> RetryPolicy:
    """A step whose money side is decided (the customer paid, Stripe refunded): retried until it lands."""
    return RetryPolicy(initial_interval=timedelta(seconds=1), backoff_coefficient=2.0,
                       maximum_interval=timedelta(minutes=5), maximum_attempts=0,
                       non_retryable_error_types=list(refusals))


def error_of(err: ActivityError) -> ApplicationError:
    """The typed error behind a failed activity (its ``type`` is the creditflow code)."""
    cause = err.cause
    if isinstance(cause, ApplicationError):
        return cause
    return ApplicationError(str(cause or err), type=type(cause).__name__ if cause else "activity_failed")


def error_details(error: ApplicationError) -> dict[str, Any]:
    """The details dict an activity's refusal carries (e.g. ``decline_code``), or empty."""
    return error.details[0] if error.details and isinstance(error.details[0], dict) else {}


def publish_status(account_id: str, status: str, *, enabled: bool = True) -> None:
    """Upsert the account id and status search attributes (filterable in the Temporal UI). ``enabled`` False
    where the server has none of creditflow's attributes (the time-skipping test server: tests, simulator)."""
    if enabled:
        workflow.upsert_search_attributes([SA_ACCOUNT_ID.value_set(account_id), SA_STATUS.value_set(status)])
