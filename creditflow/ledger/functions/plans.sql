-- plans: today's definitions (creditflow/ledger/functions_check.py and docs/development.md, "Database functions"). Edit here; no migration.
-- The plan credits left now (lots brought up to date first).
CREATE OR REPLACE FUNCTION cf_plan_credits_left(p_account text) RETURNS bigint LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM balances WHERE account_id = p_account FOR UPDATE;
    PERFORM cf_settle_account_burns(p_account);
    RETURN (SELECT coalesce(sum(remaining_micros), 0) FROM credit_lots
            WHERE account_id = p_account AND source = 'plan' AND NOT depleted);
END $$;

-- The whole-expiry form (0012) is this one without a cap: one body to maintain.
CREATE OR REPLACE FUNCTION cf_expire_plan_credits(p_account text, p_key text, p_description text) RETURNS bigint
LANGUAGE sql AS $$ SELECT cf_expire_plan_credits(p_account, p_key, p_description, 9223372036854775807) $$;

CREATE OR REPLACE FUNCTION cf_expire_plan_credits(p_account text, p_key text, p_description text, p_max bigint)
RETURNS bigint LANGUAGE sql AS $$ SELECT cf_expire_plan_credits(p_account, p_key, p_description, p_max, NULL) $$;

-- As in 0018, but held credits do not cap the expiry: the plan lots (of periods ending by ``p_until``) expire up to
-- ``p_max``; holds that can no longer be covered are cut first so the floor check holds.
CREATE OR REPLACE FUNCTION cf_expire_plan_credits(p_account text, p_key text, p_description text, p_max bigint,
                                                  p_until timestamptz) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_left bigint;
    v_done bigint;
    v_short bigint;
    b record;
    r cf_post_result;
BEGIN
    PERFORM 1 FROM balances WHERE account_id = p_account FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown_account' USING ERRCODE = 'CF404';
    END IF;
    SELECT -amount_micros INTO v_done FROM cf_journal_entry(p_account, p_key);
    IF FOUND THEN
        RETURN v_done;
    END IF;
    PERFORM cf_settle_account_burns(p_account);
    IF (SELECT held_micros FROM balances WHERE account_id = p_account) > 0 THEN
        PERFORM cf_expire_holds(p_account);
    END IF;
    SELECT balance_micros, held_micros, floor_micros INTO b FROM balances WHERE account_id = p_account;
    -- Plan lots burn in expiry order, so burning this amount takes it from exactly these (earliest) lots. The lots
    -- hold max(balance, 0) once burns are settled, so this never takes the balance below zero.
    SELECT least(coalesce(sum(remaining_micros), 0), p_max, greatest(b.balance_micros - b.floor_micros, 0))
        INTO v_left FROM credit_lots WHERE account_id = p_account AND source = 'plan' AND NOT depleted
        AND (p_until IS NULL OR expires_at IS NULL OR expires_at <= p_until);
    IF v_left <= 0 THEN
        RETURN 0;
    END IF;
    v_short := b.held_micros - (b.balance_micros - v_left - b.floor_micros);
    IF v_short > 0 THEN
        PERFORM cf_cut_hold_reservations(p_account, v_short);
    END IF;
    r := cf_post(p_account, 'plan_expiry', -v_left, 'system:breakage', p_description, NULL, 'plan', 0, NULL, p_key,
                 NULL);
    RETURN v_left;
END $$;
