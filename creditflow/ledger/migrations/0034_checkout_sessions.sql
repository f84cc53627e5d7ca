-- Hosted checkout sessions (issue 13, item 3; seed 000 "Complete checkout via Stripe"). docs/checkout.md.
--
-- A session fixes what is bought (a package or a custom amount: cents and credits, priced when it is created) and
-- where the buyer goes afterwards. Paying it is an ordinary top-up (stripe_charges, TopUpWorkflow) whose request id
-- is ``charge_request_id``: the session id itself for the first attempt, so a double click or a reload joins the
-- same charge; ``{id}.{n}`` only after an attempt failed (a declined card), so another card can be tried and a
-- failed charge is never repeated. The session id (122 random bits) is the capability of the hosted page;
-- ``csrf_token`` guards its POSTs.

CREATE TABLE checkout_sessions (
    id                 text PRIMARY KEY CHECK (id ~ '^cs_[0-9a-f]{32}$'),
    account_id         text NOT NULL REFERENCES accounts (id),
    status             text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'complete')),
    amount_cents       bigint NOT NULL CHECK (amount_cents > 0),
    credits            bigint NOT NULL CHECK (credits > 0),
    package_id         text,
    description        text NOT NULL,
    success_url        text NOT NULL CHECK (length(success_url) <= 2048),
    cancel_url         text NOT NULL CHECK (length(cancel_url) <= 2048),
    csrf_token         text NOT NULL,
    -- Idempotency of the creating POST (optional, as Stripe's): same key and request, the same session.
    idempotency_key    text,
    request_hash       bytea,
    -- The SetupIntent the page confirms the card with (a new one after a declined card), and how many so far.
    setup_intent_id    text,
    setup_intents      integer NOT NULL DEFAULT 0,
    -- The top-up paying this session (stripe_charges.request_id, kind 'topup') and how many attempts so far.
    charge_request_id  text,
    charge_attempts    integer NOT NULL DEFAULT 0,
    transaction_id     text,
    created_at         timestamptz NOT NULL DEFAULT now(),
    expires_at         timestamptz NOT NULL,
    completed_at       timestamptz,
    UNIQUE (account_id, idempotency_key),
    CONSTRAINT complete_has_charge CHECK (status <> 'complete' OR (charge_request_id IS NOT NULL
                                                                   AND completed_at IS NOT NULL))
);
CREATE INDEX checkout_sessions_account ON checkout_sessions (account_id, created_at DESC);
