"""Auto-recharge activities of the account workflow: read the settings with the balance, record an attempt.

The charge itself runs in ``AutoRechargeWorkflow`` with the top-up activities (one ``stripe_charges`` row of
kind ``auto_recharge`` per attempt, the PaymentIntent recorded, one ledger credit keyed by it).
"""

from __future__ import annotations

from datetime import datetime

from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel
from temporalio import activity

from activities.errors import translating_errors
from creditflow.domain.recharge import RechargeConfig, RechargePolicy
from creditflow.ledger import auto_recharge


class RechargeAccountInput(BaseModel):
    account_id: str


class RechargePlan(BaseModel):
    """The settings (None: never configured), the available balance and the operator's policy."""

    config: RechargeConfig | None
    available_micros: int
    policy: RechargePolicy
    last_seq: int = 0  # the highest recharge sequence number with a charge row (0 in results recorded before it)
    in_flight_seq: int | None = None  # a recharge an earlier run started that may still be charging


class RecordRechargeAttemptInput(BaseModel):
    account_id: str
    generation: int
    status: str
    error: str | None = None
    consecutive_failures: int = 0
    attempted_at: datetime
    disable_reason: str | None = None
    seq: int | None = None  # the attempt's sequence number and the charge it went through (kept in the history)
    charge_id: str | None = None


class AutoRechargeActivities:
    def __init__(self, pool: AsyncConnectionPool, policy: RechargePolicy) -> None:
        self._pool = pool
        self._policy = policy

    @activity.defn(name="load_auto_recharge")
    @translating_errors
    async def load_auto_recharge(self, input: RechargeAccountInput) -> RechargePlan:
        """What the workflow needs to decide whether to recharge now."""
        snap = await auto_recharge.snapshot(self._pool, input.account_id)
        return RechargePlan(config=snap.config, available_micros=snap.available_micros, policy=self._policy,
                            last_seq=snap.last_seq, in_flight_seq=snap.in_flight_seq)

    @activity.defn(name="record_auto_recharge_attempt")
    @translating_errors
    async def record_auto_recharge_attempt(self, input: RecordRechargeAttemptInput) -> bool:
        """Mirror the attempt for GET /billing/auto-recharge; disables it when ``disable_reason`` is set
        (only for the settings generation judged). Returns whether those settings were still current."""
        return await auto_recharge.record_attempt(
            self._pool, input.account_id, generation=input.generation, status=input.status, error=input.error,
            consecutive_failures=input.consecutive_failures, attempted_at=input.attempted_at,
            disable_reason=input.disable_reason, seq=input.seq, charge_id=input.charge_id)
