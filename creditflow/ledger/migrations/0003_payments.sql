-- Stripe customers: one per account, created once and never replaced.
--
-- A table of its own rather than a column on ``accounts``: payments are an adapter around the
-- ledger, the accounts row stays narrow, and this migration adds no lock or rewrite on the table the
-- hot path reads. ``customer_id`` is unique so one Stripe customer can never serve two tenants.
-- Rows are written only by ensure_customer (creditflow/payments/customers.py), under a per-account
-- advisory lock, in the same transaction that checks for an existing row.
CREATE TABLE stripe_customers (
    account_id   text PRIMARY KEY REFERENCES accounts (id),
    customer_id  text NOT NULL UNIQUE CHECK (customer_id LIKE 'cus\_%'),
    created_at   timestamptz NOT NULL DEFAULT now()
);
