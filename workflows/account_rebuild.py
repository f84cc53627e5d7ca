"""How a new ``AccountWorkflow`` run loads its state from the database.

A new run (terminated, reset, started again by the relay) has no carried state:
the database is the source of truth and the run's state a cache of it.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from activities.accounts import AccountActivities, AccountRebuild, AccountSnapshot, LoadAccountInput, RebuildInput
    from workflows.account_state import LOAD_RETRY, AccountRun


# A new run (terminated, reset, started again by the relay) rebuilds its state from the database instead of
# reading only the name; histories recorded before it read the name only.
PATCH_REBUILD_STATE = "rebuild-state-from-db"


async def load_state(run: AccountRun) -> None:
    """The first run's start: read the account (the name and status) from the ledger, or rebuild the whole state."""
    if workflow.patched(PATCH_REBUILD_STATE):
        await rebuild_state(run)
        return
    snapshot: AccountSnapshot | None = await workflow.execute_activity_method(
        AccountActivities.load_account,
        LoadAccountInput(account_id=run.input.account_id),
        start_to_close_timeout=timedelta(seconds=10),
        retry_policy=LOAD_RETRY,
        summary="Read the account from the ledger",
    )
    if snapshot is not None:
        run.input.name = snapshot.name
        run.input.status = snapshot.status


async def rebuild_state(run: AccountRun) -> None:
    """A new run (not a continue-as-new): the database is the source of truth, this run's state a cache of it.

    Reload the subscription (renewals, invoices and expiry go on; subscribing again is a plan change), the
    auto-recharge sequence and policy state (a sequence number is never reused), agents' next resume, the Stripe
    customer and the dedup window. Events that arrived with the start are kept (they are newer)."""
    i = run.input
    got: AccountRebuild = await workflow.execute_activity_method(
        AccountActivities.rebuild_account_state,
        RebuildInput(account_id=i.account_id, now=workflow.now(), dedup_capacity=i.dedup_capacity,
                     run_id=workflow.info().run_id),
        start_to_close_timeout=timedelta(seconds=30), retry_policy=LOAD_RETRY,
        summary="Rebuild the account's state from the ledger")
    if got.account is not None:
        i.name, i.status = got.account.name, got.account.status
    if i.subscription is None:
        i.subscription = got.subscription
    i.recharge = got.recharge.model_copy(update={"seq": max(got.recharge.seq, i.recharge.seq)})
    i.recharge_wake_at = i.recharge_wake_at or got.recharge_wake_at
    i.recharge_requested = i.recharge_requested or got.recharge_enabled
    i.agents_wake_at = i.agents_wake_at or got.agents_wake_at
    i.stripe_customer_id = i.stripe_customer_id or got.stripe_customer_id
    if i.stripe_customer_id is not None:
        i.stripe_customer_pending = False
    run.dedup.prepend(got.recent_dedup_keys)
    # Accepted by an earlier run that ended before applying them: applied now, before newer events.
    run.early_events[:0] = [e for e in got.unapplied if e.dedup_key not in run.dedup]
