"""Reconciliation with Stripe: compare what Stripe says happened with what the ledger recorded, repair what is
safely repairable, report the rest.

Why: webhooks get lost, workers die between a Stripe call and the commit that records it, a PaymentIntent that was
``processing`` when its workflow gave up succeeds an hour later, a refund Stripe first answered ``pending`` fails
days later. Each of these leaves the ledger and Stripe disagreeing; none is visible from the ledger alone.

A run covers the Stripe objects created in ``[since, until)`` (the SDK's auto-pagination over PaymentIntents,
refunds and disputes) plus creditflow's own rows that are not settled yet (charges and refunds younger than
``RECHECK``) and the refunds made on Stripe whose credits it took back (Stripe may fail them later), whose Stripe
objects are retrieved one by one. Matching is by Stripe ids and creditflow's metadata
(``creditflow_account_id``, ``creditflow_charge_id``, ``creditflow_refund_id``), never by amounts alone.

Repairs go through the same idempotent functions the workflows call, keyed the same way, so a repair and a
workflow (or two runs) racing each other still have one effect:

* a PaymentIntent that succeeded for a charge the ledger did not credit: ``topups.credit`` (top-ups and
  auto-recharges, ledger key ``sys:topup:{pi}``) or ``invoicing.payment.settle`` (invoices);
* a creditflow refund Stripe finished: ``refunds.finalize`` (succeeded) or ``refunds.release`` (failed/canceled:
  the reserved credits go back once);
* a refund made on Stripe, or a dispute, that took nothing back yet; a dispute won that gave nothing back:
  ``clawbacks.apply`` (keys ``sys:stripe_refund:{id}``, ``sys:dispute:{id}``, ``sys:dispute_won:{id}``).

Everything else is reported: a payment the ledger does not know, a second PaymentIntent for one charge, credits
without a payment, amounts that differ, a refund released although Stripe paid it. Objects younger than the grace
period are left to the workflows still handling them.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any, Literal

from psycopg import sql
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from creditflow.domain.reconciliation import Difference, ReconcileResult, RunReport, RunWindow
from creditflow.errors import CreditflowError
from creditflow.ledger.pagination import Cursor, keyset
from creditflow.payments import clawbacks, late, refunds, topups
from creditflow.payments.gateway import ACCOUNT_METADATA_KEY, ListedResource, StripeGateway
from creditflow.payments.refunds import REFUND_METADATA_KEY

log = logging.getLogger(__name__)

# A scheduled run starts this much before the last run's end (clocks differ; an object may be listed late).
OVERLAP = timedelta(hours=1)
# The first scheduled run looks back this far.
FIRST_LOOKBACK = timedelta(days=30)
# creditflow's own unsettled charges and refunds are re-checked with Stripe for this long after they were made.
RECHECK = timedelta(days=30)
DEFAULT_GRACE = timedelta(minutes=15)

# Refund rows whose outcome Stripe still decides.
_OPEN_REFUND_STATUSES = ("reserved", "refunding", "pending")
_FINAL_FAILED = ("failed", "canceled")


# --- runs -----------------------------------------------------------------------------------------------


async def open_run(pool: AsyncConnectionPool, run_id: str, *, trigger: Literal["schedule", "manual"],
                   since: datetime | None, now: datetime) -> RunWindow:
    """The run's window, fixed on its first call (a retried activity gets the same window). Without ``since``:
    from the last completed run's end (less ``OVERLAP``), or ``FIRST_LOOKBACK`` ago."""
    async with pool.connection() as conn:
        if since is None:
            last = await (await conn.execute(
                "SELECT max(until) AS until FROM reconciliation_runs WHERE status = 'completed'")).fetchone()
            since = last["until"] - OVERLAP if last and last["until"] else now - FIRST_LOOKBACK
        since = min(since, now)
        await conn.execute(
            "INSERT INTO reconciliation_runs (id, trigger, since, until) VALUES (%s, %s, %s, %s)"
            " ON CONFLICT (id) DO NOTHING", (run_id, trigger, since, now))
        row = await (await conn.execute("SELECT * FROM reconciliation_runs WHERE id = %s", (run_id,))).fetchone()
    assert row is not None
    return RunWindow(run_id=row["id"], trigger=row["trigger"], since=row["since"], until=row["until"])


async def record_result(pool: AsyncConnectionPool, result: ReconcileResult) -> None:
    """Store what the run found (idempotent: a retried run stores its own latest result)."""
    repaired = sum(d.action == "repaired" for d in result.differences)
    async with pool.connection() as conn:
        await conn.execute(
            "UPDATE reconciliation_runs SET listed = %s, matched = %s, repaired = %s, reported = %s,"
            " differences = %s, notes = %s WHERE id = %s",
            (Jsonb(result.listed), result.matched, repaired, len(result.differences) - repaired,
             Jsonb([d.model_dump() for d in result.differences]), Jsonb(result.notes), result.run_id))


async def complete_run(pool: AsyncConnectionPool, run_id: str, *, violations: int | None) -> RunReport:
    """The run is over: ``violations`` is what ``creditflow verify`` found after the repairs."""
    async with pool.connection() as conn:
        await conn.execute(
            "UPDATE reconciliation_runs SET status = 'completed', violations = %s,"
            " finished_at = coalesce(finished_at, now()) WHERE id = %s", (violations, run_id))
    return await get_run(pool, run_id)


async def fail_run(pool: AsyncConnectionPool, run_id: str, error: str) -> None:
    async with pool.connection() as conn:
        await conn.execute(
            "UPDATE reconciliation_runs SET status = 'failed', notes = notes || %s, finished_at = now()"
            " WHERE id = %s AND status = 'running'", (Jsonb([f"failed: {error}"]), run_id))


def _report(row: dict[str, Any]) -> RunReport:
    return RunReport(**{**row, "differences": [Difference(**d) for d in row["differences"]]})


async def get_run(pool: AsyncConnectionPool, run_id: str) -> RunReport:
    async with pool.connection() as conn:
        row = await (await conn.execute("SELECT * FROM reconciliation_runs WHERE id = %s", (run_id,))).fetchone()
    if row is None:
        raise CreditflowError("not_found", f"no reconciliation run {run_id}")
    return _report(row)


async def list_runs(pool: AsyncConnectionPool, limit: int = 20, cursor: Cursor | None = None) -> list[RunReport]:
    """Runs newest first (``started_at``, then id); ``cursor``: the page after or before a run."""
    async with pool.connection() as conn:
        where, params, order, reverse = await keyset(conn, "reconciliation_runs", None, cursor, time="started_at")
        rows = await (await conn.execute(sql.SQL("SELECT * FROM reconciliation_runs WHERE {} ORDER BY {} LIMIT %s")
                                         .format(where, order), (*params, limit))).fetchall()
    if reverse:
        rows.reverse()
    return [_report(r) for r in rows]


# --- matching -------------------------------------------------------------------------------------------


class Reconciler:
    """One run's matching and repairs. ``server_filter``: Stripe filters lists by date (off for the emulator)."""

    def __init__(self, pool: AsyncConnectionPool, gateway: StripeGateway, window: RunWindow, *, now: datetime,
                 server_filter: bool, grace: timedelta = DEFAULT_GRACE) -> None:
        self.pool = pool
        self.gateway = gateway
        self.window = window
        self.now = now
        self.server_filter = server_filter
        self.grace = grace
        self.result = ReconcileResult(run_id=window.run_id)

    async def run(self) -> ReconcileResult:
        seen_intents: set[str] = set()
        seen_refunds: set[str] = set()
        for pi in await self._list("payment_intents"):
            seen_intents.add(pi["id"])
            await self._payment_intent(pi)
        for pi_id in await self._unsettled_charges(seen_intents):
            await self._payment_intent(await self._retrieve_intent(pi_id))
        for refund in await self._list("refunds"):
            seen_refunds.add(refund["id"])
            await self._refund(refund)
        for refund_id in [*await self._open_refunds(seen_refunds), *await self._taken_stripe_refunds(seen_refunds)]:
            state = await self.gateway.retrieve_refund(refund_id)
            await self._refund({"id": state.id, "status": state.status, "amount": state.amount_cents,
                                "payment_intent": state.payment_intent_id, "metadata": state.metadata,
                                "failure_reason": state.failure_reason, "created": None})
        seen_disputes: set[str] = set()
        for dispute in await self._list("disputes", optional=True):
            seen_disputes.add(dispute["id"])
            await self._dispute(dispute)
        await self._open_disputes(seen_disputes)
        r = self.result
        log.info("reconciliation %s: listed %s, matched %d, in flight %d, %d repaired, %d reported", r.run_id,
                 r.listed, r.matched, r.in_flight, sum(d.action == "repaired" for d in r.differences),
                 sum(d.action == "reported" for d in r.differences))
        return r

    # --- Stripe side ---

    async def _list(self, resource: ListedResource, *, optional: bool = False) -> list[dict[str, Any]]:
        try:
            objects = await self.gateway.list_created_since(resource, self.window.since,
                                                            server_filter=self.server_filter)
        except CreditflowError as exc:
            if not optional or exc.code != "payment_provider_error":
                raise
            self.result.notes.append(f"{resource}: not listed ({exc.message}); the provider has no such list")
            return []
        until = int(self.window.until.timestamp())
        objects = [o for o in objects if int(o.get("created") or 0) < until]
        self.result.listed[resource] = len(objects)
        return objects

    async def _retrieve_intent(self, payment_intent_id: str) -> dict[str, Any]:
        pi = await self.gateway.retrieve_payment_intent(payment_intent_id)
        return {"id": pi.id, "status": pi.status, "amount": pi.amount_cents, "metadata": pi.metadata,
                "created": None}

    def _young(self, created: object) -> bool:
        return isinstance(created, int) and created > (self.now - self.grace).timestamp()

    def _difference(self, kind: str, action: Literal["repaired", "reported"], detail: str, *,
                    account_id: str | None, stripe_id: str | None, **ids: object) -> None:
        diff = Difference(kind=kind, action=action, account_id=account_id, stripe_id=stripe_id, detail=detail,
                          ids={k: str(v) for k, v in ids.items() if v is not None})
        (log.info if action == "repaired" else log.warning)("reconciliation %s: %s %s %s (%s)", self.window.run_id,
                                                            action, kind, stripe_id, detail)
        self.result.differences.append(diff)

    # --- PaymentIntents ---

    async def _unsettled_charges(self, seen: set[str]) -> list[str]:
        async with self.pool.connection() as conn:
            rows = await (await conn.execute(
                "SELECT payment_intent_id FROM stripe_charges WHERE status <> 'succeeded'"
                " AND payment_intent_id IS NOT NULL AND created_at >= %s ORDER BY created_at",
                (self.now - RECHECK,))).fetchall()
        return [r["payment_intent_id"] for r in rows if r["payment_intent_id"] not in seen]

    async def _charge_of(self, pi: dict[str, Any]) -> dict[str, Any] | None:
        charge_id = (pi.get("metadata") or {}).get(topups.CHARGE_METADATA_KEY)
        async with self.pool.connection() as conn:
            return await (await conn.execute(
                "SELECT * FROM stripe_charges WHERE payment_intent_id = %s OR id = %s"
                " ORDER BY payment_intent_id = %s DESC LIMIT 1", (pi["id"], charge_id, pi["id"]))).fetchone()

    async def _payment_intent(self, pi: dict[str, Any]) -> None:
        metadata = pi.get("metadata") or {}
        charge = await self._charge_of(pi)
        status, amount = str(pi.get("status")), int(pi.get("amount") or 0)
        if charge is None:
            if metadata.get(ACCOUNT_METADATA_KEY) and status == "succeeded":
                self._difference("payment_unknown_to_ledger", "reported",
                                 f"PaymentIntent succeeded for {amount} cents and names creditflow, but no charge "
                                 "row has it", account_id=metadata.get(ACCOUNT_METADATA_KEY), stripe_id=pi["id"],
                                 charge_id=metadata.get(topups.CHARGE_METADATA_KEY))
            elif not metadata.get(ACCOUNT_METADATA_KEY):
                self.result.foreign += 1
            else:
                self.result.matched += 1
            return
        account = charge["account_id"]
        if charge["payment_intent_id"] not in (None, pi["id"]):
            if status == "succeeded" and charge["status"] != "succeeded":
                # Not a duplicate: the charge was never paid (its recorded PaymentIntent failed or was canceled),
                # so this one took the money and the late path refused it (two PaymentIntents: for an operator).
                self._difference("payment_not_credited", "reported",
                                 f"a PaymentIntent succeeded ({amount} cents) for charge {charge['id']}, which "
                                 f"records another PaymentIntent, {charge['payment_intent_id']}, and is "
                                 f"{charge['status']}: nothing was credited. Check that one took no money, then "
                                 "re-drive the payment (creditflow payment-events) or refund this one",
                                 account_id=account, stripe_id=pi["id"], charge_id=charge["id"],
                                 recorded_payment_intent_id=charge["payment_intent_id"])
            elif status == "succeeded":
                self._difference("duplicate_payment", "reported",
                                 f"a second PaymentIntent succeeded ({amount} cents) for charge {charge['id']}, "
                                 f"which was paid by {charge['payment_intent_id']}: refund one of them",
                                 account_id=account, stripe_id=pi["id"], charge_id=charge["id"],
                                 recorded_payment_intent_id=charge["payment_intent_id"])
            else:
                self.result.matched += 1
            return
        if status != "succeeded":
            if charge["status"] == "succeeded":
                self._difference("credited_without_payment", "reported",
                                 f"the ledger credited charge {charge['id']} but the PaymentIntent is {status}",
                                 account_id=account, stripe_id=pi["id"], charge_id=charge["id"],
                                 ledger_txn_id=charge["ledger_txn_id"])
            else:
                self.result.matched += 1
            return
        if amount != charge["amount_cents"]:
            self._difference("amount_mismatch", "reported",
                             f"the PaymentIntent took {amount} cents; charge {charge['id']} is for "
                             f"{charge['amount_cents']}", account_id=account, stripe_id=pi["id"],
                             charge_id=charge["id"])
            return
        if charge["status"] == "succeeded":
            self.result.matched += 1
            return
        if self._young(pi.get("created")):
            self.result.in_flight += 1
            return
        await self._settle_late(charge, pi["id"])

    async def _settle_late(self, charge: dict[str, Any], payment_intent_id: str) -> None:
        """A PaymentIntent that succeeded after its workflow gave up (or whose success was never recorded): the one
        late path the webhook uses too (``creditflow.payments.late``)."""
        account = charge["account_id"]
        try:
            settled = await late.settle_late(self.pool, self.gateway, account, charge["id"], payment_intent_id)
        except CreditflowError as exc:
            self._difference("payment_not_credited", "reported",
                             f"the PaymentIntent succeeded but the repair was refused: {exc.code}: {exc.message}",
                             account_id=account, stripe_id=payment_intent_id, charge_id=charge["id"])
            return
        if settled.note == "invoice_already_paid":
            self._difference("duplicate_payment", "reported",
                             f"invoice {settled.invoice_id} was already paid by another charge: refund one",
                             account_id=account, stripe_id=payment_intent_id, charge_id=charge["id"])
        elif settled.invoice_id:
            self._difference("invoice_paid_late", "repaired", f"invoice {settled.invoice_id} marked paid",
                             account_id=account, stripe_id=payment_intent_id, charge_id=charge["id"])
        else:
            self._difference("payment_credited_late", "repaired", f"{settled.credits} credits credited once",
                             account_id=account, stripe_id=payment_intent_id, charge_id=charge["id"])

    # --- refunds ---

    async def _open_refunds(self, seen: set[str]) -> list[str]:
        """creditflow's refunds Stripe may still decide, or may still fail after reporting success (a lost
        ``refund.failed``), from the last ``RECHECK``."""
        async with self.pool.connection() as conn:
            rows = await (await conn.execute(
                "SELECT stripe_refund_id FROM refunds WHERE status = ANY(%s) AND stripe_refund_id IS NOT NULL"
                " AND created_at >= %s ORDER BY created_at",
                ([*_OPEN_REFUND_STATUSES, "succeeded"], self.now - RECHECK))).fetchall()
        return [r["stripe_refund_id"] for r in rows if r["stripe_refund_id"] not in seen]

    async def _taken_stripe_refunds(self, seen: set[str]) -> list[str]:
        """Refunds made on Stripe whose credits the ledger took back in the last ``RECHECK`` and has not given back:
        Stripe may still fail them (a lost ``refund.failed``), and a run lists only the refunds created in its window.
        One id per refund: its entry in the purchase's account, ``sys:stripe_refund:{id}`` (moved parts taken from
        other workspaces add ``:{lot}``), given back under ``sys:stripe_refund_failed:{id}``."""
        async with self.pool.connection() as conn:
            rows = await (await conn.execute(
                "SELECT k.refund_id FROM journal j CROSS JOIN LATERAL (SELECT substr(j.idempotency_key,"
                "  length('sys:stripe_refund:') + 1) AS refund_id) k"
                " WHERE j.type = 'refund' AND j.created_at >= %s AND j.idempotency_key LIKE 'sys:stripe\\_refund:%%'"
                " AND strpos(k.refund_id, ':') = 0 AND NOT EXISTS (SELECT 1 FROM journal_keys f"
                "  WHERE f.account_id = j.account_id"
                "   AND f.idempotency_key = 'sys:stripe_refund_failed:' || k.refund_id)"
                " ORDER BY j.created_at", (self.now - RECHECK,))).fetchall()
        return [r["refund_id"] for r in rows if r["refund_id"] not in seen]

    async def _refund(self, refund: dict[str, Any]) -> None:
        ours = (refund.get("metadata") or {}).get(REFUND_METADATA_KEY)
        async with self.pool.connection() as conn:
            row = await (await conn.execute(
                "SELECT * FROM refunds WHERE stripe_refund_id = %s OR id = %s ORDER BY stripe_refund_id = %s DESC"
                " LIMIT 1", (refund["id"], ours, refund["id"]))).fetchone()
        if row is not None:
            await self._own_refund(refund, refunds.RefundRecord(**row))
        elif ours:
            self._difference("refund_unknown_to_ledger", "reported",
                             f"Stripe refund names creditflow refund {ours}, which the ledger does not have",
                             account_id=(refund.get("metadata") or {}).get(ACCOUNT_METADATA_KEY),
                             stripe_id=refund["id"], refund_id=ours)
        else:
            await self._stripe_side_refund(refund)

    async def _own_refund(self, refund: dict[str, Any], record: refunds.RefundRecord) -> None:
        status, amount = str(refund.get("status")), int(refund.get("amount") or 0)
        ids = {"refund_id": record.id, "payment_intent_id": record.payment_intent_id}
        if amount != record.amount_cents:
            self._difference("refund_amount_mismatch", "reported",
                             f"Stripe refunded {amount} cents; refund {record.id} is for {record.amount_cents}",
                             account_id=record.account_id, stripe_id=refund["id"], **ids)
            return
        if (status, record.status) in (("succeeded", "succeeded"), *((f, "failed") for f in _FINAL_FAILED)):
            self.result.matched += 1
        elif status == "succeeded" and record.status == "failed":
            self._difference("refund_paid_after_release", "reported",
                             f"Stripe refunded {amount} cents but refund {record.id} released its credits: the "
                             "customer has both", account_id=record.account_id, stripe_id=refund["id"], **ids)
        elif self._young(refund.get("created")) or status not in ("succeeded", *_FINAL_FAILED):
            self.result.in_flight += 1
        else:  # Stripe decided; the row did not follow (a lost event, a dead worker): the webhook's own path
            async with self.pool.connection() as conn, conn.transaction():
                await refunds.apply_stripe_status(conn, record.id, refund["id"], status, refund.get("failure_reason"))
            if status == "succeeded":
                self._difference("refund_finalized_late", "repaired", f"refund {record.id} marked succeeded",
                                 account_id=record.account_id, stripe_id=refund["id"], **ids)
            else:
                self._difference("refund_failed_restored", "repaired",
                                 f"Stripe reports the refund {status}: the {record.credits} reserved credits went "
                                 "back once", account_id=record.account_id, stripe_id=refund["id"], **ids)

    async def _purchase_account(self, payment_intent_id: str | None) -> str | None:
        if not payment_intent_id:
            return None
        async with self.pool.connection() as conn:
            row = await (await conn.execute("SELECT account_id FROM stripe_charges WHERE payment_intent_id = %s",
                                            (payment_intent_id,))).fetchone()
        return row["account_id"] if row else None

    async def _applied(self, account_id: str, key: str) -> bool:
        """Whether ``key`` is in the journal of the account or of its named credit systems (a top-up of a system
        has its lot, and so its clawbacks, in the system's sub-account)."""
        async with self.pool.connection() as conn:
            row = await (await conn.execute("SELECT 1 FROM journal_keys WHERE account_id = %s AND idempotency_key = %s",
                                            (account_id, key))).fetchone()
            if row is None:
                row = await (await conn.execute(
                    "SELECT 1 FROM journal_keys j JOIN accounts a ON a.id = j.account_id WHERE a.parent_account_id = %s"
                    " AND j.idempotency_key = %s", (account_id, key))).fetchone()
        return row is not None

    async def _stripe_side_refund(self, refund: dict[str, Any]) -> None:
        """A refund made outside creditflow (the dashboard, support): the credits it bought must leave once."""
        pi = refund.get("payment_intent")
        account = await self._purchase_account(pi)
        if account is None:
            self.result.foreign += 1
            return
        if await self._invoice_event(refund["id"], "refund"):  # a refund of an invoice payment, applied
            self.result.matched += 1
            return
        if await self._applied(account, f"sys:stripe_refund:{refund['id']}"):
            if refund.get("status") in _FINAL_FAILED and not await self._applied(
                    account, f"sys:stripe_refund_failed:{refund['id']}"):
                async with self.pool.connection() as conn, conn.transaction():
                    restored = await clawbacks.restore_failed_refund(conn, refund)
                if restored is not None:  # None: it took nothing (the purchase's credits were used): none to give
                    self._difference("stripe_refund_failed_restored", "repaired",
                                     f"a refund made on Stripe is {refund.get('status')}: the credits it took went "
                                     "back once", account_id=account, stripe_id=refund["id"], payment_intent_id=pi)
                else:
                    self.result.matched += 1
            else:
                self.result.matched += 1
            return
        if refund.get("status") != "succeeded" or self._young(refund.get("created")):
            self.result.in_flight += 1
            return
        payload = {"payment_intent_id": pi, "stripe_charge_id": refund.get("charge"),
                   "refunds": [{"id": refund["id"], "amount": int(refund.get("amount") or 0),
                                "creditflow_refund_id": None}]}
        await self._clawback(account, clawbacks.REFUNDED, payload, refund["id"],
                             ("stripe_refund_taken_back", "stripe_refund_not_applied"),
                             f"refund of {refund.get('amount')} cents made on Stripe")

    async def _clawback(self, account: str, kind: str, payload: dict[str, Any], stripe_id: str,
                        kinds: tuple[str, str], what: str) -> None:
        """Apply a refund made on Stripe or a dispute through the account workflow's own path; ``kinds``: the
        difference's kind when it applied, and when it did not."""
        repaired_kind, unapplied_kind = kinds
        result = await clawbacks.apply(self.pool, account, kind, payload)
        if result.applied:
            taken = sum(c.taken_micros for c in result.applied)
            self._difference(repaired_kind, "repaired", f"{what}: applied ({taken} micro-credits)",
                             account_id=account, stripe_id=stripe_id, payment_intent_id=payload["payment_intent_id"])
        else:
            self._difference(unapplied_kind, "reported",
                             f"{what}: nothing applied ({'; '.join(result.ignored) or 'no effect'})",
                             account_id=account, stripe_id=stripe_id, payment_intent_id=payload["payment_intent_id"])

    # --- disputes ---

    async def _open_disputes(self, seen: set[str]) -> None:
        """Disputes the ledger still has open (their close may have been lost), retrieved from Stripe one by one."""
        async with self.pool.connection() as conn:
            rows = await (await conn.execute(
                "SELECT id FROM disputes WHERE closed_at IS NULL AND created_at >= %s ORDER BY created_at",
                (self.now - RECHECK,))).fetchall()
        for row in rows:
            if row["id"] in seen:
                continue
            try:
                dispute = await self.gateway.retrieve_dispute(row["id"])
            except CreditflowError as exc:
                if exc.code != "payment_provider_error":
                    raise
                self.result.notes.append(f"open disputes: not re-checked ({exc.message})")
                return
            await self._dispute(dispute)

    async def _invoice_event(self, stripe_id: str, kind: str) -> bool:
        """A refund or dispute of an invoice payment that the invoice already reflects."""
        async with self.pool.connection() as conn:
            row = await (await conn.execute(
                "SELECT 1 FROM invoice_payment_events WHERE stripe_id = %s AND kind = %s", (stripe_id, kind))
            ).fetchone()
        return row is not None

    async def _dispute_row(self, dispute_id: str) -> dict[str, Any] | None:
        """The dispute as the ledger knows it (opened: a row, even one that could take nothing yet)."""
        async with self.pool.connection() as conn:
            return await (await conn.execute("SELECT status, closed_at, taken_micros, returned_micros FROM disputes"
                                             " WHERE id = %s", (dispute_id,))).fetchone()

    async def _dispute(self, dispute: dict[str, Any]) -> None:
        account = await self._purchase_account(dispute.get("payment_intent"))
        if account is None:
            self.result.foreign += 1
            return
        returning = dispute.get("status") in ("won", "warning_closed")
        if await self._invoice_event(dispute["id"], "dispute"):  # an invoice payment's dispute, applied
            if returning and not await self._invoice_event(dispute["id"], "dispute_won"):
                await self._clawback(account, clawbacks.DISPUTE_CLOSED,
                                     clawbacks.outbox_payload("charge.dispute.closed", dispute), dispute["id"],
                                     ("dispute_returned", "dispute_return_not_applied"),
                                     f"invoice payment dispute closed {dispute.get('status')}")
            else:
                self.result.matched += 1
            return
        payload = clawbacks.outbox_payload("charge.dispute.created", dispute)
        row = await self._dispute_row(dispute["id"])
        if row is None:
            if self._young(dispute.get("created")):
                self.result.in_flight += 1
                return
            await self._clawback(account, clawbacks.DISPUTED, payload, dispute["id"],
                                 ("dispute_taken_back", "dispute_not_applied"),
                                 f"dispute of {dispute.get('amount')} cents")
            row = await self._dispute_row(dispute["id"])
        if returning and row is not None and row["closed_at"] is None:
            await self._clawback(account, clawbacks.DISPUTE_CLOSED, payload, dispute["id"],
                                 ("dispute_returned", "dispute_return_not_applied"),
                                 f"dispute closed {dispute.get('status')}")
        elif row is not None:
            self.result.matched += 1
