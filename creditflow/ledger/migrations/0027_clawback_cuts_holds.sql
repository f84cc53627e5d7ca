-- A dispute or a refund made on Stripe takes back the credits its money bought whatever is held.
--
-- Before: cf_clawback_lot took at most balance - held - floor, so a customer who held the whole balance (holds live up
-- to 7 days and can be renewed) when the chargeback arrived kept every credit: the dispute took 0, its claim was never
-- satisfied, and the credits were spent after the holds were released. Now, as for plan credits at a renewal (0024_1),
-- the holds give way: the clawback takes up to balance - floor, and active holds whose reservation can no longer be
-- covered are cut (newest first, cf_cut_hold_reservations); a settlement of a cut hold is charged from the next
-- source in burn order, never refused (cf_hold_settle, 0024_1).
--
-- A dispute or a refund made on Stripe that finds nothing left to take back (its credits were used) is still
-- recorded: a journal row of 0 under its key. Before, it wrote nothing, so
-- the Stripe object had no ledger effect at all: a redelivery or the daily reconciliation applied it again (taking
-- credits that came back meanwhile, or reporting it every day), and "one ledger effect per Stripe object" did not
-- hold. What it could not take is in the row's metadata (wanted_micros); the dispute's claim stays in ``disputes``.
CREATE OR REPLACE FUNCTION cf_clawback_lot(
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
    IF b.held_micros > 0 THEN
        PERFORM cf_expire_holds(p_account);
    END IF;
    SELECT balance_micros, held_micros, floor_micros INTO b FROM balances WHERE account_id = p_account;
    SELECT remaining_micros INTO v_remaining FROM credit_lots WHERE id = p_lot AND account_id = p_account FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown_purchase' USING ERRCODE = 'CF404';
    END IF;
    v_amount := greatest(0, least(p_max, v_remaining, greatest(b.balance_micros - b.floor_micros, 0)));
    IF v_amount = 0 THEN
        -- Nothing left to take (the credits were used): the Stripe object still gets its one ledger effect, a row
        -- of 0 under its key, so a redelivery or the reconciliation sees it applied; what it could not take is in
        -- the metadata (wanted_micros).
        INSERT INTO journal (account_id, type, amount_micros, counter_book, balance_after_micros, description,
                             metadata, idempotency_key)
            VALUES (p_account, p_type, 0, p_book, b.balance_micros, p_description || ' (nothing left to take)',
                    coalesce(p_metadata, '{}'::jsonb) || jsonb_build_object('wanted_micros', p_max), p_key);
        RETURN 0;
    END IF;
    -- What the holds reserved beyond what is left above the floor is cut first (the floor check holds).
    PERFORM cf_cut_hold_reservations(p_account, b.held_micros - (b.balance_micros - v_amount - b.floor_micros));
    UPDATE credit_lots SET remaining_micros = remaining_micros - v_amount, depleted = (remaining_micros = v_amount)
        WHERE id = p_lot;
    UPDATE balances SET balance_micros = balance_micros - v_amount, updated_at = now() WHERE account_id = p_account;
    INSERT INTO journal (account_id, type, amount_micros, counter_book, balance_after_micros, description,
                         metadata, idempotency_key)
        VALUES (p_account, p_type, -v_amount, p_book, b.balance_micros - v_amount, p_description,
                nullif(p_metadata, '{}'::jsonb), p_key);
    RETURN v_amount;
END $$;
