-- Stripe webhook events (issue 3, slice 3): each event id stored once, with what was done about it.
--
-- Stripe delivers at least once (and out of order), so the event id is the primary key and a
-- delivery inserts with ON CONFLICT DO NOTHING. Only a *processed* event (processed_at set) is a
-- duplicate: a delivery that failed half-way (Temporal unreachable: the API answered 503) leaves the
-- row with processed_at NULL, and Stripe's redelivery processes it then. Processing holds the row lock
-- (SELECT ... FOR UPDATE), so concurrent deliveries of one event have one effect.
-- The row is evidence, not authority: a payment event only wakes the top-up's workflow, which re-reads
-- the PaymentIntent from Stripe before anything is credited.
-- Rows are written by creditflow/payments/webhooks.py only.
CREATE TABLE stripe_events (
    id            text PRIMARY KEY CHECK (id LIKE 'evt\_%'),
    type          text NOT NULL,
    -- When Stripe created the event (its ``created``), not when it reached us.
    created       timestamptz NOT NULL,
    payload       jsonb NOT NULL,
    received_at   timestamptz NOT NULL DEFAULT now(),
    processed_at  timestamptz,
    -- signaled: the top-up workflow was woken; workflow_closed: its workflow had already finished;
    -- ignored: not ours (unknown PaymentIntent, or a type creditflow does not handle);
    -- recorded: kept for a later slice (refunds, disputes).
    outcome       text CHECK (outcome IN ('signaled', 'workflow_closed', 'ignored', 'recorded')),
    -- The top-up the event was routed to, if any.
    charge_id     text REFERENCES stripe_charges (id),
    -- Processing attempts (a delivery that failed and its redeliveries) and the last failure.
    attempts      integer NOT NULL DEFAULT 0,
    last_error    text,
    CONSTRAINT processed_has_outcome CHECK ((processed_at IS NULL) = (outcome IS NULL))
);
CREATE INDEX stripe_events_unprocessed ON stripe_events (received_at) WHERE processed_at IS NULL;
CREATE INDEX stripe_events_charge ON stripe_events (charge_id) WHERE charge_id IS NOT NULL;
