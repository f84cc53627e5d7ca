-- Money that went back outside creditflow's own refund flow (issue 3): a refund made on Stripe directly
-- (``charge.refunded`` with a refund id creditflow did not create) or a dispute (``charge.dispute.created``).
-- The credits that payment bought are taken back from that purchase's own lot (never from bonus or plan
-- credits), at most what remains of it and never below the floor, once per key.
CREATE FUNCTION cf_clawback_lot(
    p_account text, p_lot text, p_max bigint, p_type text, p_book text, p_key text, p_description text,
    p_metadata jsonb
) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    b record;
    v_remaining bigint;
    v_amount bigint;
    v_done bigint;
BEGIN
    SELECT balance_micros, held_micros, floor_micros INTO b FROM balances WHERE account_id = p_account FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown_account' USING ERRCODE = 'CF404';
    END IF;
    SELECT -amount_micros INTO v_done FROM journal WHERE account_id = p_account AND idempotency_key = p_key;
    IF FOUND THEN
        RETURN v_done;
    END IF;
    PERFORM cf_settle_burns(p_account);
    SELECT balance_micros, held_micros, floor_micros INTO b FROM balances WHERE account_id = p_account;
    SELECT remaining_micros INTO v_remaining FROM credit_lots WHERE id = p_lot AND account_id = p_account FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown_purchase' USING ERRCODE = 'CF404';
    END IF;
    v_amount := least(p_max, v_remaining, greatest(b.balance_micros - b.held_micros - b.floor_micros, 0));
    IF v_amount <= 0 THEN
        RETURN 0;
    END IF;
    UPDATE credit_lots SET remaining_micros = remaining_micros - v_amount, depleted = (remaining_micros = v_amount)
        WHERE id = p_lot;
    UPDATE balances SET balance_micros = balance_micros - v_amount, updated_at = now() WHERE account_id = p_account;
    INSERT INTO journal (account_id, type, amount_micros, counter_book, balance_after_micros, description,
                         metadata, idempotency_key)
        VALUES (p_account, p_type, -v_amount, p_book, b.balance_micros - v_amount, p_description,
                nullif(p_metadata, '{}'::jsonb), p_key);
    RETURN v_amount;
END $$;

-- Stripe events routed to the account workflow through the outbox have their own outcome.
ALTER TABLE stripe_events DROP CONSTRAINT stripe_events_outcome_check;
ALTER TABLE stripe_events ADD CONSTRAINT stripe_events_outcome_check
    CHECK (outcome IN ('signaled', 'workflow_closed', 'ignored', 'recorded', 'routed'));
