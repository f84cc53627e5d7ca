-- Disputes closing as inquiries (issue 11, defect 8): a dispute closed ``warning_closed`` returns what it took, like
-- one closed ``won``, once (creditflow/payments/clawbacks.py; key sys:dispute_won:{dispute_id}).
--
-- cf_lot_return: credits taken from a purchase's lot come back to THAT lot (not to a new, unpriced one), so the
-- lot's price (paid_cents for original_micros, 0023_1) keeps describing what it holds and the credits stay
-- refundable with their purchase. As any grant and as cf_refund_release: what the account drew on its overage
-- line meanwhile is repaid first, the lot gets back only what ends up above zero, never more than its original.
-- System posting: key 'sys:...', replayed by key.
CREATE FUNCTION cf_lot_return(
    p_account text, p_lot text, p_amount bigint, p_type text, p_book text, p_key text, p_description text,
    p_metadata jsonb
) RETURNS cf_post_result LANGUAGE plpgsql AS $$
DECLARE
    r cf_post_result;
    b record;
    l record;
    v_back bigint;
BEGIN
    r := cf_refund_prepare(p_account, p_key, NULL, p_amount);
    IF r.txn_id IS NOT NULL THEN
        r.lot_id := p_lot;
        RETURN r;
    END IF;
    SELECT original_micros, remaining_micros INTO l FROM credit_lots
        WHERE id = p_lot AND account_id = p_account FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown_purchase' USING ERRCODE = 'CF404';
    END IF;
    SELECT balance_micros, held_micros, floor_micros INTO b FROM balances WHERE account_id = p_account;
    r.balance_micros := b.balance_micros + p_amount;
    v_back := greatest(0, least(p_amount, r.balance_micros));
    IF l.remaining_micros + v_back > l.original_micros THEN
        RAISE EXCEPTION 'lot_return_exceeds_lot' USING ERRCODE = 'CF500';
    END IF;
    UPDATE credit_lots SET remaining_micros = remaining_micros + v_back,
                           depleted = (remaining_micros + v_back = 0)
        WHERE id = p_lot;
    UPDATE balances SET balance_micros = r.balance_micros, updated_at = now() WHERE account_id = p_account;
    r.held_micros := b.held_micros;
    r.floor_micros := b.floor_micros;
    r.amount_micros := p_amount;
    r.lot_id := p_lot;
    r.replayed := false;
    INSERT INTO journal (account_id, type, amount_micros, counter_book, balance_after_micros, description,
                         metadata, idempotency_key)
        VALUES (p_account, p_type, p_amount, p_book, r.balance_micros, p_description,
                nullif(p_metadata, '{}'::jsonb), p_key)
        RETURNING id INTO r.txn_id;
    RETURN r;
END $$;
