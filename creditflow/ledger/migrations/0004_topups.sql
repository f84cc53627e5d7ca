-- Top-ups through Stripe (issue 3, slice 2): the charge record and the notifications log.
--
-- stripe_charges: one row per top-up request, written BEFORE Stripe is called. localstripe ignores
-- Stripe idempotency keys (and a key expires after 24 h on Stripe), so this row is what makes a charge
-- happen once: (account_id, request_id) is unique, the PaymentIntent id is recorded right after it is
-- created, and a retry that finds it retrieves that PaymentIntent instead of creating another. The
-- ledger credit is keyed ``sys:topup:{payment_intent_id}`` (a reserved prefix), so it lands once whatever is retried.
-- Rows are written by creditflow/payments/topups.py only.
CREATE TABLE stripe_charges (
    id                 text PRIMARY KEY CHECK (id ~ '^chg_[0-9a-f]{32}$'),
    account_id         text NOT NULL REFERENCES accounts (id),
    request_id         text NOT NULL,
    kind               text NOT NULL DEFAULT 'topup' CHECK (kind IN ('topup')),
    amount_cents       bigint NOT NULL CHECK (amount_cents > 0),
    credits            bigint NOT NULL CHECK (credits > 0),
    package_id         text,
    description        text NOT NULL,
    -- As requested (NULL: the default card, or the client-secret path when there is none).
    requested_payment_method_id text,
    -- The card actually charged (NULL: the client-secret path).
    payment_method_id  text,
    customer_id        text NOT NULL,
    status             text NOT NULL DEFAULT 'pending'
                       CHECK (status IN ('pending', 'requires_action', 'succeeded', 'failed', 'canceled')),
    payment_intent_id  text UNIQUE CHECK (payment_intent_id LIKE 'pi\_%'),
    failure_code       text,
    decline_code       text,
    failure_message    text,
    ledger_txn_id      text,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    UNIQUE (account_id, request_id),
    CONSTRAINT succeeded_has_credit CHECK (status <> 'succeeded' OR (payment_intent_id IS NOT NULL
                                                                     AND ledger_txn_id IS NOT NULL))
);
CREATE INDEX stripe_charges_account_created ON stripe_charges (account_id, created_at DESC);

-- notifications_log: every notification creditflow decided to send (receipts today; the
-- notifications issue adds channels). ``dedup_key`` is unique so a retried activity writes once.
CREATE TABLE notifications_log (
    id          bigserial PRIMARY KEY,
    account_id  text NOT NULL REFERENCES accounts (id),
    kind        text NOT NULL,
    channel     text NOT NULL DEFAULT 'log',
    dedup_key   text NOT NULL UNIQUE,
    payload     jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX notifications_log_account ON notifications_log (account_id, created_at DESC);
