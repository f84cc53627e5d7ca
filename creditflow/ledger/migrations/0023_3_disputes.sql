-- A dispute during a refund is not lost (issue 11, defect 7): a dispute that arrived while a refund held the
-- purchase's credits in reserve took back 0 and was never retried; Stripe then refused the refund of the disputed
-- charge, the reserve was released, and the customer kept both the credits and the disputed money.
--
-- disputes: one row per Stripe dispute of a creditflow purchase, written in the same transaction as its clawback
-- (creditflow/payments/clawbacks.py). claimed_micros: the credits its money bought, in the lot's own proportion
-- (ceil(amount_cents x original_micros / paid_cents), at most the lot). taken_micros: what was taken back so far.
-- The rule: what the lot could not give when the dispute opened stays claimed; when a refund of the same purchase
-- is released (Stripe refused or failed it), the released credits satisfy the open claims first, in the same
-- transaction as the release (journal ``dispute``, key sys:dispute:{dispute_id}:refund:{refund_id}), and only the
-- rest goes back to the wallet. A dispute closed ``won`` or ``warning_closed`` claims nothing more and gives back
-- what it took, once (returned_micros).
CREATE TABLE disputes (
    id                 text PRIMARY KEY,
    account_id         text NOT NULL REFERENCES accounts (id),
    charge_id          text NOT NULL REFERENCES stripe_charges (id),
    payment_intent_id  text NOT NULL,
    lot_id             text NOT NULL REFERENCES credit_lots (id),
    amount_cents       bigint NOT NULL CHECK (amount_cents >= 0),
    claimed_micros     bigint NOT NULL CHECK (claimed_micros >= 0),
    taken_micros       bigint NOT NULL DEFAULT 0 CHECK (taken_micros >= 0 AND taken_micros <= claimed_micros),
    returned_micros    bigint NOT NULL DEFAULT 0 CHECK (returned_micros >= 0 AND returned_micros <= taken_micros),
    status             text NOT NULL DEFAULT 'open',
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    closed_at          timestamptz
);
CREATE INDEX disputes_account ON disputes (account_id, created_at DESC);
CREATE INDEX disputes_open_claims ON disputes (lot_id) WHERE taken_micros < claimed_micros;

-- Disputes applied before this migration: their journal row (key sys:dispute:{id}) is what was taken (and claimed).
INSERT INTO disputes (id, account_id, charge_id, payment_intent_id, lot_id, amount_cents, claimed_micros,
                      taken_micros, created_at)
    SELECT substr(j.idempotency_key, length('sys:dispute:') + 1), j.account_id, c.id, c.payment_intent_id, l.id,
           coalesce((j.metadata ->> 'amount_cents')::bigint, 0), -j.amount_micros, -j.amount_micros, j.created_at
    FROM journal j
    JOIN stripe_charges c ON c.account_id = j.account_id AND c.payment_intent_id = j.metadata ->> 'payment_intent_id'
                         AND c.status = 'succeeded'
    JOIN credit_lots l ON l.account_id = j.account_id AND c.ledger_txn_id = 'txn_' || replace(l.txn_id::text, '-', '')
    WHERE j.type = 'dispute' AND j.idempotency_key LIKE 'sys:dispute:%'
    ON CONFLICT (id) DO NOTHING;
UPDATE disputes d SET status = 'won', returned_micros = d.taken_micros, closed_at = j.created_at
    FROM journal j
    WHERE j.account_id = d.account_id AND j.idempotency_key = 'sys:dispute_won:' || d.id;
