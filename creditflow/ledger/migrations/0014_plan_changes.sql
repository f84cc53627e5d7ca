-- Immediate plan changes (issue 4): proration lines waiting for the period's invoice, and expiring only part of
-- the plan credits (a downgrade gives back the credits that came with the rest of the period).

-- Amounts (cents; negative = a credit to the customer) billed on the invoice of ``period_key``. Written by the
-- account workflow's activity once per change (``change_seq``), read when the period closes.
CREATE TABLE billing_adjustments (
    account_id    text NOT NULL REFERENCES accounts (id),
    period_key    text NOT NULL,
    change_seq    integer NOT NULL,
    line          integer NOT NULL,
    description   text NOT NULL,
    amount_cents  bigint NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, period_key, change_seq, line)
);

ALTER TABLE billing_periods ADD COLUMN adjustments jsonb NOT NULL DEFAULT '[]'::jsonb;

-- As cf_expire_plan_credits, but at most ``p_max`` micro-credits (what is left if less).
CREATE FUNCTION cf_expire_plan_credits(p_account text, p_key text, p_description text, p_max bigint) RETURNS bigint
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
    SELECT least(coalesce(sum(remaining_micros), 0), p_max) INTO v_left
        FROM credit_lots WHERE account_id = p_account AND source = 'plan' AND NOT depleted;
    IF v_left <= 0 THEN
        RETURN 0;
    END IF;
    r := cf_post(p_account, 'plan_expiry', -v_left, 'system:breakage', p_description, NULL, 'plan', 0, NULL, p_key,
                 NULL);
    RETURN v_left;
END $$;

-- The whole-expiry form (0012) is this one without a cap: one body to maintain.
CREATE OR REPLACE FUNCTION cf_expire_plan_credits(p_account text, p_key text, p_description text) RETURNS bigint
LANGUAGE sql AS $$ SELECT cf_expire_plan_credits(p_account, p_key, p_description, 9223372036854775807) $$;
