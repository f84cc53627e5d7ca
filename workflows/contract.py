"""The public Temporal contract of creditflow: workflow names and ids, signal and query names, search
attributes and the payload models they carry.

Other services (through ``creditflow.client`` or a plain Temporal client) depend on these names, so they
change only with a migration plan. The models are pydantic (the pydantic data converter is used
everywhere) and every field added later must have a default so old histories and callers keep working.
This module is pure (no I/O at import) so workflows can pass it through the sandbox.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field
from temporalio.common import SearchAttributeKey

# --- AccountWorkflow -------------------------------------------------------------------------------

ACCOUNT_WORKFLOW = "AccountWorkflow"
ACCOUNT_WORKFLOW_ID_PREFIX = "account:"
SIGNAL_OUTBOX_EVENT = "outbox_event"
QUERY_STATE = "state"

# Dedup keys the account workflow remembers (and carries across continue-as-new).
DEFAULT_DEDUP_CAPACITY = 1000

# Account status as seen by the workflow; "unknown" until the ledger has been read.
STATUS_UNKNOWN = "unknown"


def account_workflow_id(account_id: str) -> str:
    """``account:{account_id}``: one entity workflow per account."""
    return f"{ACCOUNT_WORKFLOW_ID_PREFIX}{account_id}"


# --- Search attributes (all Keyword) ---------------------------------------------------------------

SA_ACCOUNT_ID = SearchAttributeKey.for_keyword("CreditflowAccountId")
SA_STATUS = SearchAttributeKey.for_keyword("CreditflowStatus")
SA_PLAN = SearchAttributeKey.for_keyword("CreditflowPlan")
SEARCH_ATTRIBUTES: tuple[SearchAttributeKey[str], ...] = (SA_ACCOUNT_ID, SA_STATUS, SA_PLAN)


# --- Payloads --------------------------------------------------------------------------------------


class OutboxEvent(BaseModel):
    """One outbox row, delivered to the account workflow by the relay (signal ``outbox_event``).

    ``dedup_key`` is unique per row: the workflow ignores a key it has already seen, so the relay may
    deliver at least once and the effect still happens once."""

    dedup_key: str
    kind: str
    payload: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime


class AccountWorkflowInput(BaseModel):
    """Input of ``AccountWorkflow``; also the state carried across continue-as-new."""

    account_id: str
    name: str | None = None
    status: str = STATUS_UNKNOWN
    # True once the ledger has been read (first run); later runs skip the load.
    loaded: bool = False
    # Oldest first, at most ``dedup_capacity`` keys.
    recent_dedup_keys: list[str] = Field(default_factory=list)
    dedup_capacity: int = Field(default=DEFAULT_DEDUP_CAPACITY, ge=1)
    events_processed: int = 0
    duplicates_ignored: int = 0
    last_event_kind: str | None = None
    last_event_at: datetime | None = None
    continued_as_new: int = 0
    # Continue-as-new after this many new events in one run, on top of the server's suggestion.
    # None (production) relies on the suggestion only; tests set a small number.
    continue_as_new_after_events: int | None = Field(default=None, ge=1)
    # Stripe customer (issue 3): requested by ``account.created``, created by an activity exactly once.
    stripe_customer_pending: bool = False
    stripe_customer_id: str | None = None
    # The error code when creating it failed for good (it is then created on first use by the API).
    stripe_customer_error: str | None = None


class AccountState(BaseModel):
    """Answer of the ``state`` query."""

    account_id: str
    name: str | None = None
    status: str = STATUS_UNKNOWN
    events_processed: int = 0
    duplicates_ignored: int = 0
    last_event_kind: str | None = None
    last_event_at: datetime | None = None
    recent_dedup_keys: int = 0
    continued_as_new: int = 0
    stripe_customer_id: str | None = None
