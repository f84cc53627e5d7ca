-- Setup-mode checkout sessions (issue 14: "add a card" without paying). docs/checkout.md, docs/portal.md.
--
-- A session in mode 'setup' buys nothing (no amount, no credits): the hosted page confirms a card with Stripe.js on
-- a SetupIntent exactly as a payment session does, and completing it saves the card on the account's customer
-- (``payment_method_id``; made the default when ``set_default``) instead of charging it. The same page, the same
-- SetupIntent bookkeeping and CSRF token, one card form.

ALTER TABLE checkout_sessions
    ADD COLUMN mode text NOT NULL DEFAULT 'payment' CHECK (mode IN ('payment', 'setup')),
    ADD COLUMN set_default boolean NOT NULL DEFAULT false,
    ADD COLUMN payment_method_id text;

ALTER TABLE checkout_sessions DROP CONSTRAINT checkout_sessions_amount_cents_check,
    DROP CONSTRAINT checkout_sessions_credits_check,
    DROP CONSTRAINT complete_has_charge;

ALTER TABLE checkout_sessions
    ADD CONSTRAINT what_is_bought CHECK (
        (mode = 'payment' AND amount_cents > 0 AND credits > 0)
        OR (mode = 'setup' AND amount_cents = 0 AND credits = 0 AND package_id IS NULL)),
    ADD CONSTRAINT complete_has_outcome CHECK (
        status <> 'complete' OR (completed_at IS NOT NULL AND CASE mode
            WHEN 'payment' THEN charge_request_id IS NOT NULL
            ELSE payment_method_id IS NOT NULL END));
