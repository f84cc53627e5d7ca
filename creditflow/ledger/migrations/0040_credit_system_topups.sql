-- Top-ups that name the credit system they fund (issue 13 item 7, docs/credit-systems.md).
--
-- stripe_charges.credit_system_id: the named system a top-up buys credits in; NULL is the default system (the
-- wallet), so every existing row and every wallet top-up is unchanged. The charge stays the customer's (account_id:
-- its Stripe customer, its request ids, its list of top-ups); its purchase lot (with its price, 0023_1) lives in
-- the system's ledger sub-account ``<account id>.<system id>`` (0032). Refunds, disputes, Stripe-side refunds,
-- reconciliation and ``creditflow verify`` find that lot through the charge's ledger account:
-- coalesce(account_id || '.' || credit_system_id, account_id).
ALTER TABLE stripe_charges ADD COLUMN credit_system_id text REFERENCES credit_systems (id)
    CHECK (credit_system_id <> 'credits');
