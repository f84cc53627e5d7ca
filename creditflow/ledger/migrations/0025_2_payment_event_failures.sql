-- Issue 11, defect 11: a payment event (refund or dispute made on Stripe, a late payment) that the account workflow
-- could not apply for a reason a retry cannot fix is kept here with its error, never just logged and dropped.
-- Operators list them (`creditflow payment-events failed`) and re-drive one after fixing its cause
-- (`creditflow payment-events redrive ID`: a new outbox row with the same kind and payload); a later success of the
-- event (or of a re-drive) marks it resolved.
CREATE TABLE payment_event_failures (
    id               bigserial PRIMARY KEY,
    account_id       text NOT NULL,
    dedup_key        text NOT NULL,  -- the outbox row's key (a re-drive's key is this one + '#redrive-N')
    kind             text NOT NULL,
    payload          jsonb NOT NULL DEFAULT '{}'::jsonb,
    error_code       text NOT NULL,
    error_message    text NOT NULL DEFAULT '',
    failures         integer NOT NULL DEFAULT 1,
    redrives         integer NOT NULL DEFAULT 0,
    first_failed_at  timestamptz NOT NULL DEFAULT now(),
    last_failed_at   timestamptz NOT NULL DEFAULT now(),
    resolved_at      timestamptz,
    UNIQUE (account_id, dedup_key)
);
CREATE INDEX payment_event_failures_open ON payment_event_failures (id) WHERE resolved_at IS NULL;
