-- Lots carry their price (issue 11, defect 1: a package of 1,200 credits for $10 refunded at 1 credit = 1 cent left
-- 200 credits behind, every time).
--
-- credit_lots.paid_cents: the money paid for the lot, in cents; original_micros are the credits that money bought
-- (a package's bonus included). NULL for grants nobody paid for (plan, welcome bonus, promotional, goodwill,
-- adjustment, dispute reversal). Set in the same transaction as the lot by the top-up and auto-recharge credit
-- (creditflow/payments/topups.py through creditflow/ledger/postings.py). Refunds and disputes move credits and
-- money in the lot's own proportion (creditflow/domain/lots.py: cents rounded down, credits rounded up).
-- No CHECK constraint: every statement writing credit_lots (the burns of the hot path) would re-read it (0022);
-- the writer is one place and passes the charge's amount, which stripe_charges already checks (> 0).
ALTER TABLE credit_lots ADD COLUMN paid_cents bigint;

-- Existing purchase and auto-recharge lots: the charge that created them (stripe_charges.ledger_txn_id is the lot's
-- journal row as 'txn_<hex>').
UPDATE credit_lots l SET paid_cents = c.amount_cents
    FROM stripe_charges c
    WHERE l.source IN ('purchase', 'auto_recharge') AND l.paid_cents IS NULL
      AND c.account_id = l.account_id AND c.status = 'succeeded'
      AND c.ledger_txn_id = 'txn_' || replace(l.txn_id::text, '-', '');
