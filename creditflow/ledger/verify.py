"""``creditflow verify``: the ledger's invariants, structural and economic, checked on demand.

Why: a balanced ledger can still create or lose money where two features cross (a bonus package refunded at
1 credit = 1 cent, plan credits kept alive by a hold, overage repaid twice). Each check below is one SQL query
that returns the rows that break it, with the ids needed to investigate; an empty report means every invariant
holds. The checks only read, except that an account's deferred burns are applied first (the same bookkeeping
every read of the lots does), so lot balances are exact.

Structural invariants are the floor (entries sum to zero, balance = journal = lots, floor, holds); economic ones
say the money is conserved: each purchase lot's credits and money move together in the lot's own proportion,
plan credits die with their period, each Stripe object has one ledger effect, each invoice's overage is repaid
at most once.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel, Field, computed_field

from creditflow.errors import CreditflowError

# The longest a hold may live (the API's hold_ttl_seconds bound); an active hold meant to outlive it is a defect.
MAX_HOLD_SECONDS = 7 * 24 * 3600


class Violation(BaseModel):
    """One broken invariant: which check, which account, what is wrong and the ids to look at."""

    check: str
    account_id: str | None = None
    message: str
    ids: dict[str, str] = Field(default_factory=dict)


class VerifyReport(BaseModel):
    checked_at: datetime
    account_id: str | None = None  # None: every account
    accounts_checked: int
    checks: list[str]
    violations: list[Violation]

    @computed_field  # type: ignore[prop-decorator]
    @property
    def ok(self) -> bool:
        return not self.violations


@dataclass(frozen=True)
class Check:
    """A named invariant: ``sql`` selects the rows that break it (``%(account)s`` is NULL for every account);
    ``explain`` turns one such row into a message; every other column of the row becomes an id."""

    name: str
    doc: str
    sql: str
    explain: str


# One account's checks cover its balances in named credit systems too (its sub-accounts, docs/credit-systems.md).
_ACCOUNT = "(%(account)s::text IS NULL OR {col} = ANY(%(accounts)s::text[]))"
# The ledger account a charge's purchase lot lives in: the account (the wallet), or its sub-account in the named
# credit system the top-up funded (migration 0040; creditflow.payments.topups.charge_ledger_account).
_LEDGER = "coalesce({c}.account_id || '.' || {c}.credit_system_id, {c}.account_id)"
# A charge row names its ledger entry as 'txn_<32 hex>'.
_UUID = "(CASE WHEN {col} ~ '^txn_[0-9a-f]{{32}}$' THEN substr({col}, 5)::uuid END)"

# Per PaymentIntent: the money that went back to the payer and the credits taken back for it. creditflow's refunds
# (not failed); refunds made on Stripe (not failed since: a failed one gave its credits back); disputes (their
# money unless won or closed as an inquiry; what they took and did not give back).
_RETURNED = (
    "WITH returned AS ("
    " WITH ours AS ("
    "  SELECT r.payment_intent_id, r.amount_cents AS cents, -coalesce(j.amount_micros, 0)"
    # the parts reserved from workspaces a transfer moved the purchase's credits to (0031_3)
    "   - coalesce((SELECT sum(jm.amount_micros) FROM credit_lots lm JOIN journal jm ON jm.account_id = lm.account_id"
    "     AND jm.idempotency_key = j.idempotency_key || ':' || lm.id WHERE lm.origin_lot_id = r.lot_id), 0)"
    "   AS taken_micros, r.amount_cents AS refunded_cents"
    # the reservation is in the purchase lot's account (the wallet, or a named credit system's)
    "  FROM refunds r LEFT JOIN journal j ON j.id = r.reserve_txn_id"
    "   AND j.account_id = (SELECT lr.account_id FROM credit_lots lr WHERE lr.id = r.lot_id)"
    "  WHERE r.status <> 'failed'),"
    " on_stripe AS ("
    "  SELECT j.metadata->>'payment_intent_id' AS payment_intent_id, (j.metadata->>'amount_cents')::bigint AS cents,"
    "   -j.amount_micros AS taken_micros, (j.metadata->>'amount_cents')::bigint AS refunded_cents"
    "  FROM journal j WHERE j.type = 'refund' AND j.idempotency_key LIKE 'sys:stripe\\_refund:%%'"
    "   AND NOT EXISTS (SELECT 1 FROM journal_keys f WHERE f.account_id = j.account_id AND f.idempotency_key ="
    "    'sys:stripe_refund_failed:' || substr(j.idempotency_key, length('sys:stripe_refund:') + 1))),"
    " disputed AS ("
    "  SELECT payment_intent_id, CASE WHEN status IN ('won', 'warning_closed') THEN 0 ELSE amount_cents END AS cents,"
    "   taken_micros - returned_micros AS taken_micros, 0::bigint AS refunded_cents FROM disputes)"
    " SELECT payment_intent_id, sum(cents)::bigint AS cents, sum(taken_micros)::bigint AS taken_micros,"
    "  sum(refunded_cents)::bigint AS refunded_cents, count(cents) AS items"  # a moved part carries no cents
    " FROM (SELECT * FROM ours UNION ALL SELECT * FROM on_stripe UNION ALL SELECT * FROM disputed) x"
    " WHERE payment_intent_id IS NOT NULL GROUP BY payment_intent_id) "
)


CHECKS: tuple[Check, ...] = (
    Check(
        "journal_sums_to_zero",
        "The sum of every journal line (wallet legs and system books) is zero.",
        "SELECT NULL::text AS account_id, sum(amount_micros) AS sum_micros FROM journal_lines"
        " WHERE %(account)s::text IS NULL HAVING coalesce(sum(amount_micros), 0) <> 0",
        "the journal's lines sum to {sum_micros} micros, not 0",
    ),
    Check(
        "balance_equals_journal",
        "Each account's balance equals the sum of its journal entries.",
        "SELECT b.account_id, b.balance_micros, coalesce(j.s, 0) AS journal_micros FROM balances b"
        " LEFT JOIN (SELECT account_id, sum(amount_micros) AS s FROM journal GROUP BY account_id) j"
        " USING (account_id) WHERE b.balance_micros <> coalesce(j.s, 0) AND " + _ACCOUNT.format(col="b.account_id"),
        "balance {balance_micros} micros but its journal sums to {journal_micros}",
    ),
    Check(
        "balance_after_is_running_sum",
        "Each journal row's balance_after is the running sum of the account's entries.",
        "SELECT account_id, id::text AS transaction_id, balance_after_micros, running_micros FROM ("
        " SELECT account_id, id, balance_after_micros, sum(amount_micros) OVER (PARTITION BY account_id ORDER BY seq)"
        " AS running_micros FROM journal WHERE " + _ACCOUNT.format(col="account_id") + ") x"
        " WHERE balance_after_micros <> running_micros",
        "transaction records balance_after {balance_after_micros} micros; the running sum is {running_micros}",
    ),
    Check(
        "balance_above_floor",
        "No balance net of holds is below its floor (zero, or minus the overage credit line).",
        "SELECT account_id, balance_micros, held_micros, floor_micros FROM balances"
        " WHERE balance_micros - held_micros < floor_micros AND " + _ACCOUNT.format(col="account_id"),
        "balance {balance_micros} - held {held_micros} is below the floor {floor_micros} (micros)",
    ),
    Check(
        "held_equals_active_holds",
        "What the balance row holds equals the sum of the account's active holds.",
        "SELECT b.account_id, b.held_micros, coalesce(h.s, 0) AS holds_micros FROM balances b"
        " LEFT JOIN (SELECT account_id, sum(amount_micros) AS s FROM holds WHERE status = 'active'"
        " GROUP BY account_id) h USING (account_id)"
        " WHERE b.held_micros <> coalesce(h.s, 0) AND " + _ACCOUNT.format(col="b.account_id"),
        "held {held_micros} micros but its active holds sum to {holds_micros}",
    ),
    Check(
        "holds_within_max_lifetime",
        "No active hold is set to live longer than the longest hold allowed (7 days).",
        "SELECT account_id, id AS hold_id, created_at::text AS created_at, expires_at::text AS expires_at FROM holds"
        f" WHERE status = 'active' AND expires_at > created_at + interval '{MAX_HOLD_SECONDS} seconds'"
        " AND " + _ACCOUNT.format(col="account_id"),
        "hold {hold_id} created {created_at} expires {expires_at}, beyond the 7-day maximum",
    ),
    Check(
        "lots_equal_balance",
        "The credit lots hold exactly the positive part of the balance (deferred burns applied).",
        "SELECT b.account_id, b.balance_micros, coalesce(l.s, 0) AS lots_micros, b.unburned_micros FROM balances b"
        " LEFT JOIN (SELECT account_id, sum(remaining_micros) AS s FROM credit_lots GROUP BY account_id) l"
        " USING (account_id) WHERE coalesce(l.s, 0) - b.unburned_micros <> greatest(b.balance_micros, 0)"
        " AND " + _ACCOUNT.format(col="b.account_id"),
        "lots hold {lots_micros} micros (unburned {unburned_micros}) for a balance of {balance_micros}",
    ),
    Check(
        "usage_priced_by_its_rate",
        "Each usage entry debits round(quantity x rate) micro-credits (less what a cut hold's settlement could not "
        "cover, recorded as uncovered_micros).",
        "SELECT account_id, idempotency_key, amount_micros, quantity::text AS quantity,"
        " credits_per_unit::text AS credits_per_unit FROM journal WHERE type = 'usage'"
        " AND amount_micros <> -round(quantity * credits_per_unit * 1000000)"
        "  + coalesce((metadata ->> 'uncovered_micros')::bigint, 0)"  # a cut hold settled beyond what was left
        " AND " + _ACCOUNT.format(col="account_id"),
        "usage {idempotency_key} debits {amount_micros} micros for {quantity} x {credits_per_unit} credits",
    ),
    Check(
        "charge_credited_once",
        "Each succeeded top-up or auto-recharge charge is credited by exactly one journal entry of its credits.",
        "SELECT c.account_id, c.id AS charge_id, c.payment_intent_id, c.ledger_txn_id, c.credits,"
        " coalesce(j.amount_micros, 0) AS credited_micros FROM stripe_charges c"
        " LEFT JOIN journal j ON c.ledger_txn_id IS NOT NULL AND j.type <> 'usage'"
        "  AND j.id = " + _UUID.format(col="c.ledger_txn_id") + " AND j.account_id = " + _LEDGER.format(c="c") +
        " WHERE c.status = 'succeeded' AND c.kind IN ('topup', 'auto_recharge')"
        " AND coalesce(j.amount_micros, 0) <> c.credits * 1000000 AND " + _ACCOUNT.format(col="c.account_id"),
        "charge {charge_id} ({payment_intent_id}) bought {credits} credits; its entry {ledger_txn_id} credited "
        "{credited_micros} micros",
    ),
    Check(
        "recharge_success_is_its_own_charge",
        "Each auto-recharge attempt recorded as succeeded went through a charge of its own, succeeded and credited "
        "(a success is never an earlier attempt's charge taken again: nothing charged, nothing credited).",
        "SELECT a.account_id, a.charge_id, count(*) AS attempts, string_agg(a.seq::text, ', ' ORDER BY a.seq) AS seqs,"
        " max(c.status) AS charge_status, max(c.ledger_txn_id) AS ledger_txn_id FROM auto_recharge_attempts a"
        " LEFT JOIN stripe_charges c ON c.id = a.charge_id AND c.account_id = a.account_id"
        " WHERE a.status = 'succeeded' AND " + _ACCOUNT.format(col="a.account_id") +
        " GROUP BY a.account_id, a.charge_id"
        " HAVING count(*) > 1 OR a.charge_id IS NULL OR max(c.status) IS DISTINCT FROM 'succeeded'"
        "  OR max(c.ledger_txn_id) IS NULL",
        "{attempts} auto-recharge attempt(s) (seq {seqs}) succeeded with charge {charge_id} (status "
        "{charge_status}, entry {ledger_txn_id}): a success needs a succeeded, credited charge of its own",
    ),
    Check(
        "purchase_traces_to_a_charge",
        "Each purchase or auto-recharge credit in the journal traces to exactly one succeeded Stripe charge.",
        "SELECT j.account_id, j.id::text AS transaction_id, j.type, count(c.id) AS charges FROM journal j"
        " LEFT JOIN stripe_charges c ON c.ledger_txn_id = 'txn_' || replace(j.id::text, '-', '')"
        "  AND c.status = 'succeeded'"
        " WHERE j.type IN ('purchase', 'auto_recharge') AND " + _ACCOUNT.format(col="j.account_id") +
        " GROUP BY j.account_id, j.id, j.type HAVING count(c.id) <> 1",
        "{type} entry {transaction_id} is backed by {charges} succeeded charges, not 1",
    ),
    Check(
        "refunds_within_paid",
        "No charge has more money refunded (by creditflow or on Stripe) than was paid.",
        _RETURNED + "SELECT c.account_id, c.id AS charge_id, c.payment_intent_id, c.amount_cents,"
        " r.refunded_cents"
        " FROM stripe_charges c JOIN returned r ON r.payment_intent_id = c.payment_intent_id"
        " WHERE r.refunded_cents > c.amount_cents AND " + _ACCOUNT.format(col="c.account_id"),
        "charge {charge_id} ({payment_intent_id}) paid {amount_cents} cents and refunded {refunded_cents}",
    ),
    Check(
        "credits_leave_with_their_money",
        "Money returned from a purchase (refunds, Stripe refunds, disputes not won) takes back at least the credits "
        "it bought, in the lot's own proportion, unless nothing of the lot is left to take.",
        _RETURNED + "SELECT c.account_id, c.id AS charge_id, c.payment_intent_id, l.id AS lot_id,"
        " c.amount_cents AS paid_cents,"
        " l.original_micros, l.remaining_micros, r.cents AS returned_cents, r.taken_micros,"
        " ceil(r.cents::numeric * l.original_micros / c.amount_cents)::bigint AS owed_micros"
        " FROM stripe_charges c JOIN returned r ON r.payment_intent_id = c.payment_intent_id"
        " JOIN credit_lots l ON l.account_id = " + _LEDGER.format(c="c") + " AND l.txn_id = " +
        _UUID.format(col="c.ledger_txn_id") +
        " WHERE c.status = 'succeeded' AND c.kind IN ('topup', 'auto_recharge')"
        " AND l.remaining_micros + coalesce((SELECT sum(lm.remaining_micros) FROM credit_lots lm"
        "  WHERE lm.origin_lot_id = l.id), 0) > 0"
        " AND r.taken_micros < ceil(r.cents::numeric * l.original_micros / c.amount_cents)"
        " AND " + _ACCOUNT.format(col="c.account_id"),
        "lot {lot_id} bought {original_micros} micros for {paid_cents} cents; {returned_cents} cents went back but "
        "only {taken_micros} micros were taken (owed {owed_micros}) while {remaining_micros} remain",
    ),
    Check(
        "credits_taken_back_at_most_their_money",
        "A purchase's refunds and disputes never take back more credits than the money that went back bought (a "
        "won or inquiry-closed dispute gives its credits back), allowing each refund its rounding of under a cent.",
        _RETURNED + "SELECT c.account_id, c.id AS charge_id, c.payment_intent_id, l.id AS lot_id,"
        " c.amount_cents AS paid_cents, l.original_micros, r.cents AS returned_cents, r.taken_micros,"
        " ceil(r.cents::numeric * l.original_micros / c.amount_cents)::bigint AS owed_micros"
        " FROM stripe_charges c JOIN returned r ON r.payment_intent_id = c.payment_intent_id"
        " JOIN credit_lots l ON l.account_id = " + _LEDGER.format(c="c") + " AND l.txn_id = " +
        _UUID.format(col="c.ledger_txn_id") + " WHERE c.status = 'succeeded' AND c.kind IN ('topup', 'auto_recharge')"
        " AND r.taken_micros > ceil((r.cents + r.items)::numeric * l.original_micros / c.amount_cents)"
        " AND " + _ACCOUNT.format(col="c.account_id"),
        "lot {lot_id} bought {original_micros} micros for {paid_cents} cents; {returned_cents} cents went back but "
        "{taken_micros} micros were taken (owed {owed_micros})",
    ),
    Check(
        "stripe_refund_one_effect",
        "A Stripe refund is either creditflow's own refund or a clawback, never both.",
        "SELECT r.account_id, r.id AS refund_id, r.stripe_refund_id FROM refunds r JOIN journal j"
        " ON j.account_id = (SELECT lr.account_id FROM credit_lots lr WHERE lr.id = r.lot_id)"
        "  AND j.idempotency_key = 'sys:stripe_refund:' || r.stripe_refund_id"
        " WHERE r.status <> 'failed' AND " + _ACCOUNT.format(col="r.account_id"),
        "Stripe refund {stripe_refund_id} took credits back twice: refund {refund_id} and a clawback",
    ),
    Check(
        "refund_succeeded_only_when_stripe_did",
        "A refund is marked succeeded only when Stripe reported it succeeded (a pending one may still fail).",
        "SELECT account_id, id AS refund_id, stripe_refund_id, stripe_status FROM refunds"
        " WHERE status = 'succeeded' AND stripe_status IS DISTINCT FROM 'succeeded'"
        " AND " + _ACCOUNT.format(col="account_id"),
        "refund {refund_id} is succeeded but Stripe's refund {stripe_refund_id} was {stripe_status}",
    ),
    Check(
        "invoice_charged_once",
        "An invoice is paid by at most one successful charge.",
        "SELECT i.account_id, i.id AS invoice_id, count(c.id) AS charges,"
        " string_agg(c.payment_intent_id, ' ' ORDER BY c.created_at) AS payment_intents"
        " FROM invoices i JOIN stripe_charges c ON c.account_id = i.account_id AND c.kind = 'invoice'"
        "  AND c.status = 'succeeded' AND (c.request_id = i.id OR c.request_id LIKE i.id || ':%%')"
        " WHERE " + _ACCOUNT.format(col="i.account_id") +
        " GROUP BY i.account_id, i.id HAVING count(c.id) > 1",
        "invoice {invoice_id} was paid {charges} times: {payment_intents}",
    ),
    Check(
        "plan_credits_die_with_their_period",
        "No plan lot of a closed billing period has credits left.",
        "SELECT l.account_id, l.id AS lot_id, l.remaining_micros, l.expires_at::text AS expires_at,"
        " p.period_key FROM credit_lots l JOIN LATERAL (SELECT period_key FROM billing_periods bp"
        "  WHERE bp.account_id = l.account_id AND bp.period_end >= l.expires_at"
        "   AND bp.closed_at < now() - interval '5 minutes'"  # its renewal (close, grant, expiry) has had time to end
        "  ORDER BY bp.period_end LIMIT 1) p ON true"
        " WHERE l.source = 'plan' AND l.remaining_micros > 0 AND l.expires_at IS NOT NULL"
        " AND " + _ACCOUNT.format(col="l.account_id"),
        "plan lot {lot_id} of period {period_key} (expiring {expires_at}) still holds {remaining_micros} micros",
    ),
    Check(
        "plan_granted_once_per_period",
        "An account gets one plan grant per billing period: no two plan grants (a subscription's or a renewal's; an "
        "immediate plan change's top-up is keyed by its change and not counted) cover overlapping periods.",
        # A grant's period: its key's start date at its lot's expiry's time of day (periods start and end at the
        # anchor's UTC time of day) up to its lot's expiry (the period's end).
        "WITH g AS (SELECT j.account_id, j.seq, j.id::text AS transaction_id, l.id AS lot_id,"
        " j.metadata ->> 'period_key' AS period_key, l.expires_at,"
        " ((j.metadata ->> 'period_key')::date + (l.expires_at AT TIME ZONE 'UTC')::time) AT TIME ZONE 'UTC'"
        "  AS starts_at"
        " FROM journal j JOIN credit_lots l ON l.account_id = j.account_id AND l.txn_id = j.id"
        " WHERE j.type = 'plan_grant' AND j.idempotency_key ~ '^sys:plan_grant:[0-9]{4}-[0-9]{2}-[0-9]{2}$'"
        "  AND l.expires_at IS NOT NULL AND " + _ACCOUNT.format(col="j.account_id") + ")"
        " SELECT a.account_id, a.transaction_id, a.lot_id, a.period_key, b.transaction_id AS again_transaction_id,"
        " b.lot_id AS again_lot_id, b.period_key AS again_period_key FROM g a JOIN g b"
        " ON b.account_id = a.account_id AND b.seq > a.seq"
        "  AND b.starts_at < a.expires_at AND a.starts_at < b.expires_at",
        "plan credits granted twice for one month: period {period_key} (entry {transaction_id}, lot {lot_id}) and "
        "the overlapping period {again_period_key} (entry {again_transaction_id}, lot {again_lot_id})",
    ),
    Check(
        "overage_billed_at_most_drawn",
        "Invoices never bill more overage than the account ever drew on its credit line (each unit billed once).",
        "SELECT d.account_id, d.drawn_micros, coalesce(i.billed, 0) AS billed_micros FROM ("
        " SELECT account_id,"
        "  sum(greatest(0, -balance_after_micros) - greatest(0, amount_micros - balance_after_micros)) AS drawn_micros"
        " FROM journal WHERE amount_micros < 0 AND " + _ACCOUNT.format(col="account_id") +
        "  GROUP BY account_id) d"
        " LEFT JOIN (SELECT account_id, sum(overage_micros) AS billed FROM invoices WHERE status <> 'void'"
        "  GROUP BY account_id) i USING (account_id) WHERE coalesce(i.billed, 0) > d.drawn_micros",
        "invoices billed {billed_micros} micros of overage; the account only ever drew {drawn_micros}",
    ),
    Check(
        "overage_billed_in_whole_credits",
        "Overage is billed in whole credits (rounded down), so what a payment restores is what was billed.",
        "SELECT account_id, id AS invoice_id, overage_micros FROM invoices"
        " WHERE overage_micros %% 1000000 <> 0 AND " + _ACCOUNT.format(col="account_id"),
        "invoice {invoice_id} bills {overage_micros} micros of overage, not a whole number of credits",
    ),
    Check(
        "overage_repayment_creates_no_credits",
        "A paid invoice only repays the credit line: its restoration never leaves spendable credits behind.",
        "SELECT account_id, id::text AS transaction_id, amount_micros, balance_after_micros FROM journal"
        " WHERE type = 'overage_repayment' AND least(amount_micros, balance_after_micros) > 0"
        " AND " + _ACCOUNT.format(col="account_id"),
        "overage repayment {transaction_id} of {amount_micros} micros left the balance at {balance_after_micros}: "
        "credits created, not the line repaid",
    ),
    Check(
        "invoice_repaid_at_most_its_overage",
        "A paid invoice gives back at most the overage it billed, once.",
        "SELECT i.account_id, i.id AS invoice_id, i.overage_micros, sum(j.amount_micros) AS repaid_micros,"
        " count(*) AS entries FROM invoices i JOIN journal j ON j.account_id = i.account_id"
        "  AND j.type = 'overage_repayment' AND j.idempotency_key LIKE 'sys:invoice:' || i.id || '%%'"
        " WHERE " + _ACCOUNT.format(col="i.account_id") +
        " GROUP BY i.account_id, i.id, i.overage_micros"
        " HAVING sum(j.amount_micros) > i.overage_micros OR count(*) > 1",
        "invoice {invoice_id} billed {overage_micros} micros of overage and {entries} entries gave back "
        "{repaid_micros}",
    ),
    Check(
        "invoice_payment_reversals_reflected",
        "Each refund made on Stripe and each dispute of an invoice payment that the account workflow applied (its "
        "outbox row) is reflected on the invoice once (invoice_payment_events), never taken as a purchase's or "
        "ignored: the invoice is unpaid and its credit-line restoration taken back.",
        "SELECT o.account_id, i.id AS invoice_id, o.id AS outbox_row_id, o.dedup_key AS event,"
        " CASE WHEN o.kind = 'stripe.charge.refunded' THEN 'refund' ELSE 'dispute' END AS kind, x.stripe_id,"
        " o.payload ->> 'payment_intent_id' AS payment_intent_id"
        " FROM outbox o JOIN invoices i ON i.account_id = o.account_id"
        "  AND i.payment_intent_id = o.payload ->> 'payment_intent_id'"
        " CROSS JOIN LATERAL (SELECT r ->> 'id' AS stripe_id FROM jsonb_array_elements("
        "   CASE WHEN jsonb_typeof(o.payload -> 'refunds') = 'array' THEN o.payload -> 'refunds' ELSE '[]' END) r"
        "  WHERE o.kind = 'stripe.charge.refunded' AND r ->> 'creditflow_refund_id' IS NULL"
        "  UNION ALL SELECT o.payload ->> 'dispute_id' WHERE o.kind = 'stripe.charge.dispute.created') x"
        " WHERE o.kind IN ('stripe.charge.refunded', 'stripe.charge.dispute.created') AND o.applied_at IS NOT NULL"
        " AND NOT EXISTS (SELECT 1 FROM invoice_payment_events e WHERE e.invoice_id = i.id"
        "  AND e.stripe_id = x.stripe_id"
        "  AND e.kind = CASE WHEN o.kind = 'stripe.charge.refunded' THEN 'refund' ELSE 'dispute' END)"
        " AND " + _ACCOUNT.format(col="o.account_id"),
        "{kind} {stripe_id} of the payment {payment_intent_id} of invoice {invoice_id} was applied (outbox row "
        "{outbox_row_id}, {event}) but the invoice does not reflect it",
    ),
    Check(
        "credit_balance_carried_and_applied",
        "An invoice whose lines come to less than zero adds the difference to the account's credit balance, and "
        "each later invoice applies what it can of it (min(balance, billed)), in the order they were issued.",
        "SELECT account_id, invoice_id, billed_cents, credit_applied_cents, credit_added_cents, available_cents FROM ("
        " SELECT i.account_id, i.id AS invoice_id, i.subtotal_cents + i.credit_applied_cents AS billed_cents,"
        "  i.credit_applied_cents, i.credit_added_cents, coalesce(sum(i.credit_added_cents - i.credit_applied_cents)"
        "  OVER (PARTITION BY i.account_id ORDER BY i.created_at, i.id"
        "   ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS available_cents"
        " FROM invoices i WHERE " + _ACCOUNT.format(col="i.account_id") + ") x"
        " WHERE credit_applied_cents <> least(available_cents, greatest(0, billed_cents))"
        "  OR credit_added_cents <> greatest(0, -billed_cents)",
        "invoice {invoice_id} billed {billed_cents} cents with a credit balance of {available_cents}: it applied "
        "{credit_applied_cents} and added {credit_added_cents}",
    ),
    Check(
        "outbox_delivered_in_order",
        "An account's outbox rows reach its workflow in the order they were written: a row is never delivered "
        "while an earlier row of the account is still undelivered (a dispute's close before its opening).",
        "SELECT account_id, row_id, kind, dispatched_at, earlier_delivered_at::text AS earlier_delivered_at FROM ("
        " SELECT o.account_id, o.id AS row_id, o.kind, o.dispatched_at,"
        "  max(coalesce(o.dispatched_at, 'infinity'::timestamptz)) OVER (PARTITION BY o.account_id ORDER BY o.id"
        "   ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS earlier_delivered_at"
        " FROM outbox o WHERE o.account_id IS NOT NULL AND " + _ACCOUNT.format(col="o.account_id") + ") x"
        " WHERE dispatched_at < earlier_delivered_at",
        "outbox row {row_id} ({kind}) was delivered at {dispatched_at}, before an earlier row of its account "
        "(delivered: {earlier_delivered_at})",
    ),
)

# Transfers between workspaces (0031_2): both legs, the lots they created, and the credits' provenance.
TRANSFER_CHECKS: tuple[Check, ...] = (
    Check(
        "transfer_balanced",
        "Each transfer has its two legs (out of the source, into the destination, for its amount) and the lots it "
        "created on the destination hold exactly that amount when created.",
        "SELECT t.from_account_id AS account_id, t.id AS transfer_id, t.amount_micros,"
        " coalesce(o.amount_micros, 0) AS out_micros, coalesce(i.amount_micros, 0) AS in_micros,"
        " coalesce((SELECT sum(l.original_micros) FROM credit_lots l WHERE l.transfer_id = t.id), 0) AS lots_micros"
        " FROM transfers t"
        " LEFT JOIN journal o ON o.account_id = t.from_account_id AND o.id = t.out_txn_id AND o.type = 'transfer_out'"
        " LEFT JOIN journal i ON i.account_id = t.to_account_id AND i.id = t.in_txn_id AND i.type = 'transfer_in'"
        " WHERE (%(account)s::text IS NULL OR %(account)s IN (t.from_account_id, t.to_account_id))"
        " AND (coalesce(o.amount_micros, 0) <> -t.amount_micros OR coalesce(i.amount_micros, 0) <> t.amount_micros"
        "  OR coalesce((SELECT sum(l.original_micros) FROM credit_lots l WHERE l.transfer_id = t.id), 0)"
        "   <> t.amount_micros)",
        "transfer {transfer_id} of {amount_micros} micros: out leg {out_micros}, in leg {in_micros}, lots created "
        "{lots_micros}",
    ),
    Check(
        "transfer_within_organization",
        "Both workspaces of a transfer belong to the transfer's organization.",
        "SELECT t.from_account_id AS account_id, t.id AS transfer_id, t.organization_id,"
        " f.organization_id AS from_organization, d.organization_id AS to_organization FROM transfers t"
        " JOIN accounts f ON f.id = t.from_account_id JOIN accounts d ON d.id = t.to_account_id"
        " WHERE (f.organization_id IS DISTINCT FROM t.organization_id"
        "  OR d.organization_id IS DISTINCT FROM t.organization_id)"
        " AND (%(account)s::text IS NULL OR %(account)s IN (t.from_account_id, t.to_account_id))",
        "transfer {transfer_id} of organization {organization_id} moved credits from a workspace of "
        "{from_organization} to one of {to_organization}",
    ),
    Check(
        "transfer_keeps_provenance",
        "A lot a transfer created has its parent's source, priority and expiry, lives on the transfer's destination "
        "while its parent lives on the source, links to the parent's origin (a lot no transfer created), and has no "
        "price of its own (its price is its origin's), so no transfer makes credits refundable, longer-lived or "
        "priced differently.",
        "SELECT l.account_id, l.id AS lot_id, l.transfer_id, p.id AS parent_lot_id, l.source,"
        " p.source AS parent_source, l.expires_at::text AS expires_at, p.expires_at::text AS parent_expires_at"
        " FROM credit_lots l"
        " LEFT JOIN credit_lots p ON p.id = l.parent_lot_id"
        " LEFT JOIN credit_lots o ON o.id = l.origin_lot_id"
        " LEFT JOIN transfers t ON t.id = l.transfer_id"
        " WHERE (l.transfer_id IS NOT NULL OR l.parent_lot_id IS NOT NULL OR l.origin_lot_id IS NOT NULL)"
        " AND (p.id IS NULL OR o.id IS NULL OR t.id IS NULL OR o.origin_lot_id IS NOT NULL"
        "  OR l.source <> p.source OR l.priority <> p.priority OR l.expires_at IS DISTINCT FROM p.expires_at"
        "  OR l.origin_lot_id <> coalesce(p.origin_lot_id, p.id) OR l.paid_cents IS NOT NULL"
        "  OR l.account_id <> t.to_account_id OR p.account_id <> t.from_account_id)"
        " AND " + _ACCOUNT.format(col="l.account_id"),
        "lot {lot_id} (transfer {transfer_id}, {source}, expires {expires_at}) does not carry the provenance of its "
        "parent {parent_lot_id} ({parent_source}, expires {parent_expires_at})",
    ),
    Check(
        "transfer_conserves_lot_credits",
        "No lot's credits are multiplied by transfers: what the lots a transfer split off a lot received never "
        "exceeds that lot's original credits.",
        "SELECT p.account_id, p.id AS lot_id, p.original_micros, sum(l.original_micros) AS moved_micros"
        " FROM credit_lots p JOIN credit_lots l ON l.parent_lot_id = p.id"
        " WHERE " + _ACCOUNT.format(col="p.account_id") +
        " GROUP BY p.account_id, p.id, p.original_micros HAVING sum(l.original_micros) > p.original_micros",
        "lot {lot_id} had {original_micros} micros but transfers moved {moved_micros} out of it",
    ),
)
CHECKS = CHECKS + TRANSFER_CHECKS


def _violation(check: Check, row: dict[str, Any]) -> Violation:
    ids = {k: str(v) for k, v in row.items() if k != "account_id" and v is not None}
    return Violation(check=check.name, account_id=row.get("account_id"),
                     message=check.explain.format(**{k: row.get(k) for k in row}), ids=ids)


async def verify(pool: AsyncConnectionPool, account_id: str | None = None) -> VerifyReport:
    """Run every check over one account or all of them; the report lists each violation found."""
    async with pool.connection() as conn:
        if account_id is not None:
            exists = await (await conn.execute("SELECT 1 FROM accounts WHERE id = %s", (account_id,))).fetchone()
            if exists is None:
                raise CreditflowError("unknown_account", f"no account {account_id}")
        scope = {"account": account_id, "accounts": [] if account_id is None else [account_id, *[
            r["id"] for r in await (await conn.execute("SELECT id FROM accounts WHERE parent_account_id = %s",
                                                       (account_id,))).fetchall()]]}
        accounts = [r["account_id"] for r in await (await conn.execute(
            "SELECT account_id FROM balances WHERE unburned_micros > 0 AND " + _ACCOUNT.format(col="account_id"),
            scope)).fetchall()]
        for acc in accounts:  # deferred burns applied, one short transaction per account (the lots become exact)
            async with conn.transaction():
                await conn.execute("SELECT cf_settle_account_burns(%s)", (acc,))
        violations: list[Violation] = []
        async with conn.transaction():
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            row = await (await conn.execute(
                "SELECT count(*) AS n, now() AS at FROM accounts"  # sub-accounts are checked with their account
                " WHERE (%(account)s::text IS NULL AND parent_account_id IS NULL) OR id = %(account)s",
                scope)).fetchone()
            assert row is not None
            for check in CHECKS:
                rows = await (await conn.execute(check.sql, scope)).fetchall()
                violations.extend(_violation(check, r) for r in rows)
    return VerifyReport(checked_at=row["at"], account_id=account_id, accounts_checked=int(row["n"]),
                        checks=[c.name for c in CHECKS], violations=violations)
