-- posting: today's definitions (creditflow/ledger/functions_check.py and docs/development.md, "Database functions"). Edit here; no migration.
-- Burn lots in order (creditflow.domain.lots): plan, promotional, purchased; earliest expiry
-- first; oldest first. Callers pass only the part of a debit that is above zero (the rest is
-- drawn on the overage credit line), so the lots always hold exactly max(balance, 0).
-- Caller holds the account's balances row lock, which serializes every lot writer.
CREATE OR REPLACE FUNCTION cf_burn(p_account text, p_amount bigint) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_left bigint := p_amount;
    v_lot record;
    v_take bigint;
BEGIN
    IF p_amount <= 0 THEN
        RETURN;
    END IF;
    -- Fast path: the first lot in burn order covers the whole amount (the common case).
    UPDATE credit_lots SET remaining_micros = remaining_micros - p_amount,
                           depleted = (remaining_micros = p_amount)
    WHERE id = (SELECT id FROM credit_lots WHERE account_id = p_account AND NOT depleted
                ORDER BY priority, expires_at NULLS LAST, created_at, id LIMIT 1)
      AND remaining_micros >= p_amount;
    IF FOUND THEN
        RETURN;
    END IF;
    FOR v_lot IN
        SELECT id, remaining_micros FROM credit_lots
        WHERE account_id = p_account AND NOT depleted
        ORDER BY priority, expires_at NULLS LAST, created_at, id
    LOOP
        v_take := least(v_lot.remaining_micros, v_left);
        UPDATE credit_lots SET remaining_micros = remaining_micros - v_take,
                               depleted = (remaining_micros = v_take)
        WHERE id = v_lot.id;
        v_left := v_left - v_take;
        EXIT WHEN v_left = 0;
    END LOOP;
    IF v_left > 0 THEN
        RAISE EXCEPTION 'credit lots of % do not cover % micros', p_account, v_left USING ERRCODE = 'CF500';
    END IF;
END $$;

-- Apply the usage the hot path recorded but did not burn yet. Burning the sum now equals burning
-- each event in turn (same order, no lot was added in between: every lot insert settles first).
-- Caller holds the balances row lock. Returns what was burned.
CREATE OR REPLACE FUNCTION cf_settle_burns(p_account text) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    v_pending bigint;
BEGIN
    SELECT unburned_micros INTO v_pending FROM balances WHERE account_id = p_account;
    IF v_pending IS NULL OR v_pending = 0 THEN
        RETURN 0;
    END IF;
    PERFORM cf_burn(p_account, v_pending);
    UPDATE balances SET unburned_micros = 0 WHERE account_id = p_account;
    RETURN v_pending;
END $$;

-- Settle one account's pending burns in its own transaction (the worker's sweep, and any reader of
-- lots such as refund eligibility, call this first).
CREATE OR REPLACE FUNCTION cf_settle_account_burns(p_account text) RETURNS bigint LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM balances WHERE account_id = p_account FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    RETURN cf_settle_burns(p_account);
END $$;

-- cf_post keeping plan_left_micros (else as in 0002): burns were just settled, so plan_left = plan lots remaining;
-- a plan grant adds what its lot keeps (a grant first repays overage drawn), a negative amount burns plan lots first.
CREATE OR REPLACE FUNCTION cf_post(
    p_account text, p_type text, p_amount bigint, p_counter_book text, p_description text,
    p_metadata jsonb, p_lot_source text, p_lot_priority integer, p_lot_expires_at timestamptz,
    p_key text, p_hash bytea
) RETURNS cf_post_result LANGUAGE plpgsql AS $$
DECLARE
    r cf_post_result;
    b record;
    j record;
    v_kept bigint;
    v_burn bigint;
BEGIN
    IF p_amount = 0 THEN
        RAISE EXCEPTION 'invalid_amount' USING ERRCODE = 'CF400';
    END IF;
    SELECT balance_micros, held_micros, floor_micros INTO b FROM balances WHERE account_id = p_account FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown_account' USING ERRCODE = 'CF404';
    END IF;
    PERFORM cf_settle_burns(p_account);  -- lots are about to be read or added to: bring them up to date
    IF b.held_micros > 0 AND cf_expire_holds(p_account) > 0 THEN
        SELECT balance_micros, held_micros, floor_micros INTO b FROM balances WHERE account_id = p_account;
    END IF;
    r.held_micros := b.held_micros;
    r.floor_micros := b.floor_micros;
    SELECT id, request_hash, amount_micros, balance_after_micros INTO j
        FROM cf_journal_entry(p_account, p_key);
    IF FOUND THEN
        IF j.request_hash IS DISTINCT FROM p_hash THEN
            RAISE EXCEPTION 'idempotency_conflict' USING ERRCODE = 'CF409';
        END IF;
        r.txn_id := j.id;
        r.amount_micros := j.amount_micros;
        r.balance_micros := j.balance_after_micros;
        r.replayed := true;
        RETURN r;
    END IF;
    r.amount_micros := p_amount;
    r.balance_micros := b.balance_micros + p_amount;
    r.replayed := false;
    IF p_amount < 0 AND r.balance_micros - b.held_micros < b.floor_micros THEN
        RAISE EXCEPTION 'insufficient_credits' USING ERRCODE = 'CF402';
    END IF;
    INSERT INTO journal (account_id, type, amount_micros, counter_book, balance_after_micros, description,
                         metadata, idempotency_key, request_hash)
        VALUES (p_account, p_type, p_amount, p_counter_book, r.balance_micros, p_description,
                nullif(p_metadata, '{}'::jsonb), p_key, p_hash)
        RETURNING id INTO r.txn_id;
    IF p_amount > 0 AND p_type IN ('purchase', 'auto_recharge') THEN
        PERFORM cf_purchase_resumes_agents(p_account, r.txn_id);
    END IF;
    IF p_amount > 0 THEN
        r.lot_id := 'lot_' || replace(gen_random_uuid()::text, '-', '');
        -- A grant first repays any overage drawn: the lot keeps only what ends up above zero.
        v_kept := greatest(0, least(p_amount, r.balance_micros));
        INSERT INTO credit_lots (id, account_id, source, priority, original_micros, remaining_micros,
                                 depleted, expires_at, txn_id)
            VALUES (r.lot_id, p_account, p_lot_source, p_lot_priority, p_amount, v_kept, r.balance_micros <= 0,
                    p_lot_expires_at, r.txn_id);
        UPDATE balances SET balance_micros = r.balance_micros,
                            plan_left_micros = plan_left_micros + CASE WHEN p_lot_source = 'plan' THEN v_kept ELSE 0 END,
                            updated_at = now()
            WHERE account_id = p_account;
    ELSE
        v_burn := least(-p_amount, greatest(b.balance_micros, 0));
        PERFORM cf_burn(p_account, v_burn);
        UPDATE balances SET balance_micros = r.balance_micros,
                            plan_left_micros = plan_left_micros - least(plan_left_micros, v_burn), updated_at = now()
            WHERE account_id = p_account;
    END IF;
    RETURN r;
END $$;

-- Trim the account's open billed overage to what the credit line still carries, oldest period first; returns the
-- total still open. Caller holds the balances row lock.
CREATE OR REPLACE FUNCTION cf_overage_sync(p_account text) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    v_drawn bigint;
    v_open bigint;
    v_excess bigint;
    v_take bigint;
    p record;
BEGIN
    SELECT greatest(0, -balance_micros) INTO v_drawn FROM balances WHERE account_id = p_account;
    SELECT coalesce(sum(overage_open_micros), 0) INTO v_open FROM billing_periods WHERE account_id = p_account;
    v_excess := v_open - v_drawn;
    IF v_excess <= 0 THEN
        RETURN v_open;
    END IF;
    FOR p IN SELECT period_key, overage_open_micros FROM billing_periods
             WHERE account_id = p_account AND overage_open_micros > 0 ORDER BY period_start, period_key
    LOOP
        v_take := least(p.overage_open_micros, v_excess);
        UPDATE billing_periods SET overage_open_micros = overage_open_micros - v_take
            WHERE account_id = p_account AND period_key = p.period_key;
        v_excess := v_excess - v_take;
        EXIT WHEN v_excess = 0;
    END LOOP;
    RETURN v_drawn;
END $$;

-- Burn ``p_amount`` from the account's lots other than plan lots, in burn order (cf_burn without plan lots). The
-- caller settled pending burns first and checked that these lots cover the amount.
CREATE OR REPLACE FUNCTION cf_burn_wallet(p_account text, p_amount bigint) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_left bigint := p_amount;
    v_lot record;
    v_take bigint;
BEGIN
    IF p_amount <= 0 THEN
        RETURN;
    END IF;
    FOR v_lot IN
        SELECT id, remaining_micros FROM credit_lots
        WHERE account_id = p_account AND NOT depleted AND source <> 'plan'
        ORDER BY priority, expires_at NULLS LAST, created_at, id
    LOOP
        v_take := least(v_lot.remaining_micros, v_left);
        UPDATE credit_lots SET remaining_micros = remaining_micros - v_take, depleted = (remaining_micros = v_take)
            WHERE id = v_lot.id;
        v_left := v_left - v_take;
        EXIT WHEN v_left = 0;
    END LOOP;
    IF v_left > 0 THEN
        RAISE EXCEPTION 'wallet lots of % do not cover % micros', p_account, v_left USING ERRCODE = 'CF500';
    END IF;
END $$;
