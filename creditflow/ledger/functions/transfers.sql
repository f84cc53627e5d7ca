-- transfers: today's definitions (creditflow/ledger/functions_check.py and docs/development.md, "Database functions"). Edit here; no migration.
-- Move p_amount micros from p_from to p_to (workspaces of p_org), idempotent per (organization, key): the same key
-- and request hash returns the first result (replayed), another hash is idempotency_conflict. Credits move from
-- the source's transferable lots (every lot but plan credits, which die with the source's period; none expired)
-- in burn order; never more than the source has available (balance - holds), never its overage line.
CREATE OR REPLACE FUNCTION cf_transfer(
    p_org text, p_from text, p_to text, p_amount bigint, p_key text, p_hash bytea, p_description text,
    p_requested_by text
) RETURNS cf_transfer_result LANGUAGE plpgsql AS $$
DECLARE
    r cf_transfer_result;
    t record;
    src record;
    dst record;
    l record;
    v_id text;
    v_left bigint := p_amount;
    v_take bigint;
    v_out uuid := gen_random_uuid();
    v_in uuid := gen_random_uuid();
    v_transferable bigint;
BEGIN
    IF p_amount IS NULL OR p_amount <= 0 THEN
        RAISE EXCEPTION 'invalid_amount' USING ERRCODE = 'CF400';
    END IF;
    IF p_from = p_to THEN
        RAISE EXCEPTION 'same_account' USING ERRCODE = 'CF422';
    END IF;
    -- Both balance rows, in id order (any two transfers lock the same pair in the same order).
    PERFORM 1 FROM balances WHERE account_id IN (p_from, p_to) ORDER BY account_id FOR UPDATE;
    SELECT * INTO t FROM transfers WHERE organization_id = p_org AND idempotency_key = p_key;
    IF FOUND THEN
        IF t.request_hash IS DISTINCT FROM p_hash THEN
            RAISE EXCEPTION 'idempotency_conflict' USING ERRCODE = 'CF409';
        END IF;
        r.transfer_id := t.id;
        r.replayed := true;
        SELECT balance_micros INTO r.from_balance_micros FROM balances WHERE account_id = t.from_account_id;
        SELECT balance_micros INTO r.to_balance_micros FROM balances WHERE account_id = t.to_account_id;
        RETURN r;
    END IF;
    PERFORM 1 FROM accounts WHERE id IN (p_from, p_to) AND organization_id IS NOT DISTINCT FROM p_org
        HAVING count(*) = 2;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'not_in_organization' USING ERRCODE = 'CF403';
    END IF;
    PERFORM cf_settle_burns(p_from);
    PERFORM cf_settle_burns(p_to);
    PERFORM cf_expire_holds(p_from);
    SELECT balance_micros, held_micros INTO src FROM balances WHERE account_id = p_from;
    SELECT balance_micros INTO dst FROM balances WHERE account_id = p_to;
    SELECT coalesce(sum(remaining_micros), 0) INTO v_transferable FROM credit_lots
        WHERE account_id = p_from AND NOT depleted AND source <> 'plan'
          AND (expires_at IS NULL OR expires_at > cf_now());
    IF src.balance_micros - src.held_micros < p_amount OR v_transferable < p_amount THEN
        RAISE EXCEPTION 'insufficient_credits' USING ERRCODE = 'CF402';
    END IF;
    IF dst.balance_micros < 0 THEN
        -- Lots hold max(balance, 0): credits arriving on a negative balance would repay the overage line and lose
        -- their lot. Pay the invoice (or top up) first.
        RAISE EXCEPTION 'destination_in_overage' USING ERRCODE = 'CF422';
    END IF;
    v_id := 'trf_' || replace(gen_random_uuid()::text, '-', '');
    FOR l IN
        SELECT * FROM credit_lots
        WHERE account_id = p_from AND NOT depleted AND source <> 'plan'
          AND (expires_at IS NULL OR expires_at > cf_now())
        ORDER BY priority, expires_at NULLS LAST, created_at, id
        FOR UPDATE
    LOOP
        v_take := least(l.remaining_micros, v_left);
        UPDATE credit_lots SET remaining_micros = remaining_micros - v_take, depleted = (remaining_micros = v_take)
            WHERE id = l.id;
        INSERT INTO credit_lots (id, account_id, source, priority, original_micros, remaining_micros, depleted,
                                 expires_at, txn_id, paid_cents, parent_lot_id, origin_lot_id, transfer_id)
            VALUES ('lot_' || replace(gen_random_uuid()::text, '-', ''), p_to, l.source, l.priority, v_take, v_take,
                    false, l.expires_at, v_in, NULL, l.id, coalesce(l.origin_lot_id, l.id), v_id);
        v_left := v_left - v_take;
        EXIT WHEN v_left = 0;
    END LOOP;
    UPDATE balances SET balance_micros = balance_micros - p_amount, updated_at = now() WHERE account_id = p_from;
    UPDATE balances SET balance_micros = balance_micros + p_amount, updated_at = now() WHERE account_id = p_to;
    r.from_balance_micros := src.balance_micros - p_amount;
    r.to_balance_micros := dst.balance_micros + p_amount;
    INSERT INTO journal (id, account_id, type, amount_micros, counter_book, balance_after_micros, description,
                         metadata, idempotency_key, request_hash)
        VALUES (v_out, p_from, 'transfer_out', -p_amount, 'system:transfers', r.from_balance_micros,
                'Transfer to ' || p_to || coalesce(': ' || nullif(p_description, ''), ''),
                jsonb_build_object('transfer_id', v_id, 'to_account_id', p_to, 'organization_id', p_org),
                'sys:transfer:' || v_id, p_hash);
    INSERT INTO journal (id, account_id, type, amount_micros, counter_book, balance_after_micros, description,
                         metadata, idempotency_key, request_hash)
        VALUES (v_in, p_to, 'transfer_in', p_amount, 'system:transfers', r.to_balance_micros,
                'Transfer from ' || p_from || coalesce(': ' || nullif(p_description, ''), ''),
                jsonb_build_object('transfer_id', v_id, 'from_account_id', p_from,
                                                  'organization_id', p_org),
                'sys:transfer:' || v_id, p_hash);
    INSERT INTO transfers (id, organization_id, from_account_id, to_account_id, amount_micros, idempotency_key,
                           request_hash, out_txn_id, in_txn_id, description, requested_by)
        VALUES (v_id, p_org, p_from, p_to, p_amount, p_key, p_hash, v_out, v_in, p_description, p_requested_by);
    r.transfer_id := v_id;
    r.replayed := false;
    RETURN r;
END $$;
