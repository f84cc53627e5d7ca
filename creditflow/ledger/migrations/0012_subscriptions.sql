-- Billing cycles (issue 4): subscriptions, recurring charges, closed periods, plan credit expiry.
--
-- subscriptions: the account's plan and current period, written only by the account workflow (its
-- activities), which is the single writer of cycle state; the API reads it and asks the workflow for changes.
CREATE TABLE subscriptions (
    account_id       text PRIMARY KEY REFERENCES accounts (id),
    plan_id          text NOT NULL,
    status           text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'canceled')),
    anchor_at        timestamptz NOT NULL,
    period_index     integer NOT NULL CHECK (period_index >= 0),
    period_start     timestamptz NOT NULL,
    period_end       timestamptz NOT NULL CHECK (period_end > period_start),
    -- The plan from the next renewal on (a change "at the next renewal"); '' = end the subscription then.
    pending_plan_id  text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);

-- Recurring charges billed on every invoice (e.g. a monthly phone-number rental), set per account by an
-- operator. Prices are credits per unit per period, in micro-credits (1 credit = 1 cent).
CREATE TABLE recurring_charges (
    id                 text PRIMARY KEY CHECK (id ~ '^rc_[0-9a-f]{32}$'),
    account_id         text NOT NULL REFERENCES accounts (id),
    description        text NOT NULL CHECK (length(description) BETWEEN 1 AND 200),
    quantity           integer NOT NULL CHECK (quantity > 0 AND quantity <= 100000),
    unit               text NOT NULL DEFAULT '',
    unit_price_micros  bigint NOT NULL CHECK (unit_price_micros >= 0),
    active             boolean NOT NULL DEFAULT true,
    created_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX recurring_charges_account ON recurring_charges (account_id) WHERE active;

-- One row per closed period: what the renewal saw when it closed it (written once, read on every retry),
-- so the invoice of that period is built from the same facts however often the renewal is retried.
CREATE TABLE billing_periods (
    account_id            text NOT NULL REFERENCES accounts (id),
    period_key            text NOT NULL,
    period_index          integer NOT NULL,
    period_start          timestamptz NOT NULL,
    period_end            timestamptz NOT NULL,
    plan_id               text NOT NULL,
    fee_cents             bigint NOT NULL CHECK (fee_cents >= 0),
    overage_micros        bigint NOT NULL CHECK (overage_micros >= 0),
    recurring             jsonb NOT NULL DEFAULT '[]'::jsonb,
    expired_micros        bigint,
    granted_micros        bigint,
    closed_at             timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, period_key)
);

-- Expire what is left of the account's plan credits (every plan lot), once per key: a journal row of type
-- ``plan_expiry`` to ``system:breakage``. Atomic under the account lock (usage cannot burn in between);
-- a repeated key returns the first result. Returns the micro-credits expired (0: nothing was left).
CREATE FUNCTION cf_expire_plan_credits(p_account text, p_key text, p_description text) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_left bigint;
    v_done bigint;
    r cf_post_result;
BEGIN
    PERFORM 1 FROM balances WHERE account_id = p_account FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown_account' USING ERRCODE = 'CF404';
    END IF;
    SELECT -amount_micros INTO v_done FROM journal WHERE account_id = p_account AND idempotency_key = p_key;
    IF FOUND THEN
        RETURN v_done;
    END IF;
    PERFORM cf_settle_account_burns(p_account);
    SELECT coalesce(sum(remaining_micros), 0) INTO v_left
        FROM credit_lots WHERE account_id = p_account AND source = 'plan' AND NOT depleted;
    IF v_left = 0 THEN
        RETURN 0;
    END IF;
    r := cf_post(p_account, 'plan_expiry', -v_left, 'system:breakage', p_description, NULL, 'plan', 0, NULL, p_key,
                 NULL);
    RETURN v_left;
END $$;

-- The plan credits left now (lots brought up to date first).
CREATE FUNCTION cf_plan_credits_left(p_account text) RETURNS bigint LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM balances WHERE account_id = p_account FOR UPDATE;
    PERFORM cf_settle_account_burns(p_account);
    RETURN (SELECT coalesce(sum(remaining_micros), 0) FROM credit_lots
            WHERE account_id = p_account AND source = 'plan' AND NOT depleted);
END $$;
