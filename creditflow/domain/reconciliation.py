"""Reconciliation with Stripe: what a run covers and what it found (pure models shared by the engine in
``creditflow.payments.reconcile``, its activities and ``ReconciliationWorkflow``)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field


class Difference(BaseModel):
    """One disagreement between Stripe and the ledger: ``repaired`` through an idempotent path, or ``reported``."""

    kind: str
    action: Literal["repaired", "reported"]
    account_id: str | None = None
    stripe_id: str | None = None
    detail: str
    ids: dict[str, str] = Field(default_factory=dict)


class RunWindow(BaseModel):
    run_id: str
    trigger: Literal["schedule", "manual"]
    since: datetime
    until: datetime


class ReconcileResult(BaseModel):
    run_id: str
    listed: dict[str, int] = Field(default_factory=dict)
    matched: int = 0
    in_flight: int = 0
    foreign: int = 0  # objects of the Stripe account that are not creditflow's
    differences: list[Difference] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)


class RunReport(BaseModel):
    """A stored run (``reconciliation_runs``)."""

    id: str
    trigger: str
    since: datetime
    until: datetime
    status: str
    listed: dict[str, int]
    matched: int
    repaired: int
    reported: int
    differences: list[Difference]
    notes: list[str]
    violations: int | None
    started_at: datetime
    finished_at: datetime | None
