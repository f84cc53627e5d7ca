-- Plan credit expiry never fails on the floor: credits reserved by active holds (a call still running) stay
-- until the hold settles; what the floor allows expires now. Before this, a renewal with a hold reserving plan
-- credits raised insufficient_credits and its activity retried without end.
CREATE OR REPLACE FUNCTION cf_expire_plan_credits(p_account text, p_key text, p_description text, p_max bigint)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    v_left bigint;
    v_done bigint;
    b record;
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
    IF (SELECT held_micros FROM balances WHERE account_id = p_account) > 0 THEN
        PERFORM cf_expire_holds(p_account);
    END IF;
    SELECT balance_micros, held_micros, floor_micros INTO b FROM balances WHERE account_id = p_account;
    SELECT least(coalesce(sum(remaining_micros), 0), p_max, greatest(b.balance_micros - b.held_micros - b.floor_micros, 0))
        INTO v_left FROM credit_lots WHERE account_id = p_account AND source = 'plan' AND NOT depleted;
    IF v_left <= 0 THEN
        RETURN 0;
    END IF;
    r := cf_post(p_account, 'plan_expiry', -v_left, 'system:breakage', p_description, NULL, 'plan', 0, NULL, p_key,
                 NULL);
    RETURN v_left;
END $$;
