-- holds: today's definitions (creditflow/ledger/functions_check.py and docs/development.md, "Database functions"). Edit here; no migration.
-- Holds past their expiry stop reserving credits. Caller holds the balances row lock.
CREATE OR REPLACE FUNCTION cf_expire_holds(p_account text) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    v_released bigint;
BEGIN
    WITH expired AS (
        UPDATE holds SET status = 'expired', closed_at = now()
        WHERE account_id = p_account AND status = 'active' AND expires_at <= now()
        RETURNING amount_micros
    )
    SELECT coalesce(sum(amount_micros), 0) INTO v_released FROM expired;
    IF v_released > 0 THEN
        UPDATE balances SET held_micros = held_micros - v_released, updated_at = now()
        WHERE account_id = p_account;
    END IF;
    RETURN v_released;
END $$;

-- Held credits that still reserve (overdue holds excluded even before a writer or the sweeper
-- marks them): what reads report without taking the account lock.
CREATE OR REPLACE FUNCTION cf_live_held(p_account text, p_held bigint) RETURNS bigint LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN p_held = 0 THEN 0::bigint ELSE p_held - coalesce((
        SELECT sum(amount_micros) FROM holds
        WHERE account_id = p_account AND status = 'active' AND expires_at <= now()), 0)::bigint END
$$;

-- Sweep one account's overdue holds in its own short transaction (the worker drives it per
-- account, in id order, so a failure stays with that account and locks never pile up).
CREATE OR REPLACE FUNCTION cf_expire_account_holds(p_account text) RETURNS bigint LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM balances WHERE account_id = p_account FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    RETURN cf_expire_holds(p_account);
END $$;

CREATE OR REPLACE FUNCTION cf_hold_release(p_account text, p_hold text) RETURNS cf_hold_result LANGUAGE plpgsql AS $$
DECLARE
    h record;
    r cf_hold_result;
BEGIN
    r.allowed := false;
    r.replayed := false;
    r.hold_id := p_hold;
    PERFORM 1 FROM balances WHERE account_id = p_account FOR UPDATE;
    IF NOT FOUND THEN
        r.code := 'unknown_account';
        RETURN r;
    END IF;
    SELECT id, amount_micros, status, expires_at INTO h FROM holds WHERE id = p_hold AND account_id = p_account;
    IF NOT FOUND THEN
        r.code := 'unknown_hold';
        RETURN r;
    END IF;
    IF h.status = 'settled' THEN
        r.code := 'hold_settled';
        RETURN r;
    END IF;
    r.status := h.status;
    r.released_micros := 0;
    IF h.status = 'active' THEN
        UPDATE balances SET held_micros = held_micros - h.amount_micros, updated_at = now()
            WHERE account_id = p_account;
        UPDATE holds SET status = 'released', closed_at = now() WHERE id = p_hold;
        r.status := 'released';
        r.released_micros := h.amount_micros;
    END IF;
    r.allowed := true;
    r.code := 'ok';
    r.amount_micros := h.amount_micros;
    r.expires_at := h.expires_at;
    SELECT balance_micros, held_micros, floor_micros INTO r.balance_micros, r.held_micros, r.floor_micros
        FROM balances WHERE account_id = p_account;
    RETURN r;
END $$;

-- Cut active holds' reservations by ``p_amount`` micros, newest hold first. Caller holds the balances row lock.
CREATE OR REPLACE FUNCTION cf_cut_hold_reservations(p_account text, p_amount bigint) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_left bigint := p_amount;
    v_take bigint;
    h record;
BEGIN
    IF p_amount <= 0 THEN
        RETURN 0;
    END IF;
    FOR h IN SELECT id, amount_micros FROM holds
             WHERE account_id = p_account AND status = 'active' AND amount_micros > 0
             ORDER BY created_at DESC, id DESC
    LOOP
        v_take := least(h.amount_micros, v_left);
        UPDATE holds SET amount_micros = amount_micros - v_take, reservation_cut_micros = reservation_cut_micros + v_take
            WHERE id = h.id;
        v_left := v_left - v_take;
        EXIT WHEN v_left = 0;
    END LOOP;
    UPDATE balances SET held_micros = held_micros - (p_amount - v_left), updated_at = now()
        WHERE account_id = p_account;
    RETURN p_amount - v_left;
END $$;

-- As in 0002, but a hold whose reservation was cut (above) is never refused for want of credits: when cf_track
-- refuses (insufficient_credits), the usage is charged down to the floor here, on the same key and request hash cf_track would have used (so a retry replays
-- it), and the part not covered is on the row's metadata (``uncovered_micros``). A registered agent of a plan account
-- keeps its plan terms here too (as in cf_track): the plan credits it takes count against its plan-credit limit, and
-- a use_balance agent past that limit is charged from the wallet's lots only (a stop agent's charge is already within
-- its cap: cf_track refused the capped amount, and this charges less).
CREATE OR REPLACE FUNCTION cf_hold_settle(p_account text, p_hold text, p_quantity numeric, p_metadata jsonb)
RETURNS cf_track_result LANGUAGE plpgsql AS $$
DECLARE
    h record;
    b record;
    f cf_price_result;
    r cf_track_result;
    v_key text := 'hold:' || p_hold;
    v_hash bytea;
    v_price bigint;
    v_meta jsonb;
    s cf_agent_plan_state;
    v_plan_take bigint;
    v_wallet bigint := 0;
BEGIN
    PERFORM 1 FROM balances WHERE account_id = p_account FOR UPDATE;
    IF NOT FOUND THEN
        r := ROW(false, 'unknown_account', NULL, 0, NULL, NULL, NULL, NULL, NULL, false, p_hold, NULL)::cf_track_result;
        RETURN r;
    END IF;
    -- Overdue holds (this one included) stop reserving first, so nothing below releases twice.
    PERFORM cf_expire_holds(p_account);
    SELECT id, feature_id, agent_id, amount_micros, status, reservation_cut_micros INTO h FROM holds WHERE id = p_hold AND account_id = p_account;
    IF NOT FOUND THEN
        r := ROW(false, 'unknown_hold', NULL, 0, NULL, NULL, NULL, NULL, NULL, false, p_hold, NULL)::cf_track_result;
        RETURN r;
    END IF;
    IF h.status = 'released' THEN
        r := ROW(false, 'hold_released', NULL, 0, NULL, NULL, NULL, NULL, NULL, false, p_hold, NULL)::cf_track_result;
        RETURN r;
    END IF;
    IF h.status = 'active' THEN
        UPDATE balances SET held_micros = held_micros - h.amount_micros WHERE account_id = p_account;
    END IF;
    v_hash := sha256(convert_to(v_key || ':' || trim_scale(p_quantity)::text, 'UTF8'));
    v_meta := coalesce(p_metadata, '{}'::jsonb) || jsonb_build_object('hold_id', p_hold);
    r := cf_track(p_account, h.feature_id, p_quantity, h.agent_id, v_key, v_hash, v_meta);
    IF NOT r.allowed AND r.code = 'insufficient_credits'
            AND h.reservation_cut_micros > 0 THEN
        -- Charge what the account covers down to its floor (burn order as cf_track: the part above zero is owed to
        -- the lots, plan lots first; the rest is drawn on the overage line).
        SELECT balance_micros, held_micros, floor_micros, controlled, plan_id, plan_left_micros, agent_controls INTO b
            FROM balances WHERE account_id = p_account;
        IF b.plan_id IS NOT NULL AND h.agent_id IS NOT NULL AND b.agent_controls THEN
            s := cf_agent_plan(p_account, h.agent_id);
        END IF;
        f := cf_plan_price(cf_price(h.feature_id, p_quantity), b.plan_id, h.feature_id, p_quantity,
                           b.plan_left_micros > 0 AND coalesce(s.room, 1) > 0);
        v_price := f.charge_micros;
        r.charged_micros := least(v_price, greatest(0, b.balance_micros - b.held_micros - b.floor_micros));
        v_plan_take := least(r.charged_micros, b.plan_left_micros, greatest(b.balance_micros, 0));
        IF s.period_start IS NOT NULL AND NOT s.stop AND s.room < v_plan_take THEN
            -- A use_balance agent past its plan-credit limit: the rest from the wallet's lots, as far as they go.
            v_plan_take := s.room;
            v_wallet := least(r.charged_micros - v_plan_take, greatest(0, b.balance_micros - b.plan_left_micros));
            r.charged_micros := v_plan_take + v_wallet;
            PERFORM cf_settle_burns(p_account);
            PERFORM cf_burn_wallet(p_account, v_wallet);
            UPDATE balances SET balance_micros = balance_micros - r.charged_micros,
                                unburned_micros = unburned_micros + v_plan_take,
                                plan_left_micros = plan_left_micros - v_plan_take,
                                updated_at = now()
                WHERE account_id = p_account
                RETURNING balance_micros, held_micros, floor_micros INTO r.balance_micros, r.held_micros, r.floor_micros;
        ELSE
            UPDATE balances SET balance_micros = balance_micros - r.charged_micros,
                                unburned_micros = unburned_micros + least(r.charged_micros, greatest(balance_micros, 0)),
                                plan_left_micros = greatest(0, plan_left_micros
                                                               - least(r.charged_micros, greatest(balance_micros, 0))),
                                updated_at = now()
                WHERE account_id = p_account
                RETURNING balance_micros, held_micros, floor_micros INTO r.balance_micros, r.held_micros, r.floor_micros;
        END IF;
        IF b.controlled AND r.charged_micros > 0 THEN
            PERFORM cf_spend_record(p_account, h.agent_id, r.charged_micros);
        END IF;
        IF s.period_start IS NOT NULL AND v_plan_take > 0 THEN
            UPDATE agents SET plan_spent_micros = CASE WHEN plan_period_start = s.period_start THEN plan_spent_micros
                                                       ELSE 0 END + v_plan_take,
                              plan_period_start = s.period_start
                WHERE account_id = p_account AND id = h.agent_id;
        END IF;
        INSERT INTO journal (account_id, type, amount_micros, counter_book, balance_after_micros, description,
                             feature_id, channel, quantity, credits_per_unit, agent_id, idempotency_key,
                             request_hash, metadata)
            VALUES (p_account, 'usage', -r.charged_micros, 'system:usage_revenue', r.balance_micros,
                    f.name || coalesce(': ' || h.agent_id, ''), h.feature_id, f.channel, p_quantity,
                    f.credits_per_unit, h.agent_id, v_key, v_hash,
                    v_meta || jsonb_build_object('uncovered_micros', v_price - r.charged_micros))
            RETURNING id INTO r.txn_id;
        r.allowed := true;
        r.code := 'ok';
        r.required_micros := NULL;
        r.credits_per_unit := f.credits_per_unit;
    END IF;
    r.hold_id := p_hold;
    IF r.allowed AND h.status = 'active' THEN
        UPDATE holds SET status = 'settled', closed_at = now(), settled_txn_id = r.txn_id WHERE id = p_hold;
        r.released_micros := greatest(0, h.amount_micros - r.charged_micros);
    ELSIF h.status = 'active' THEN
        UPDATE balances SET held_micros = held_micros + h.amount_micros WHERE account_id = p_account;
    ELSIF r.allowed AND h.status = 'expired' AND NOT r.replayed THEN
        UPDATE holds SET status = 'settled', settled_txn_id = r.txn_id WHERE id = p_hold;
    END IF;
    RETURN r;
END $$;

-- cf_hold_unchecked (0013) with a cap on the reservation (a stop agent's holds) and the plan-rate decision given by
-- the caller (NULL: plan credits left); a capped hold answers the whole price in ``required_micros``.
CREATE OR REPLACE FUNCTION cf_hold_reserve(
    p_account text, p_feature text, p_quantity numeric, p_agent text, p_ttl_seconds integer,
    p_key text, p_hash bytea, p_metadata jsonb, p_cap bigint, p_in_plan boolean
) RETURNS cf_hold_result LANGUAGE plpgsql AS $$
DECLARE
    r cf_hold_result;
    b record;
    f cf_price_result;
    h record;
BEGIN
    r.allowed := false;
    r.replayed := false;
    SELECT balance_micros, held_micros, floor_micros, plan_id, plan_left_micros INTO b
        FROM balances WHERE account_id = p_account FOR UPDATE;
    IF NOT FOUND THEN
        r.code := 'unknown_account';
        RETURN r;
    END IF;
    SELECT id, request_hash, amount_micros, status, expires_at INTO h
        FROM holds WHERE account_id = p_account AND idempotency_key = p_key;
    IF FOUND THEN
        IF h.request_hash IS DISTINCT FROM p_hash THEN
            r.code := 'idempotency_conflict';
            RETURN r;
        END IF;
        r := ROW(true, 'ok', h.id, h.amount_micros, h.status, h.expires_at, b.balance_micros, b.held_micros,
                 b.floor_micros, NULL, true, NULL)::cf_hold_result;
        RETURN r;
    END IF;
    IF b.held_micros > 0 AND cf_expire_holds(p_account) > 0 THEN
        SELECT balance_micros, held_micros, floor_micros, plan_id, plan_left_micros INTO b
            FROM balances WHERE account_id = p_account;
    END IF;
    r.balance_micros := b.balance_micros;
    r.held_micros := b.held_micros;
    r.floor_micros := b.floor_micros;
    f := cf_plan_price(cf_price(p_feature, p_quantity), b.plan_id, p_feature, p_quantity,
                       coalesce(p_in_plan, b.plan_left_micros > 0));
    IF f.code <> 'ok' THEN
        r.code := f.code;
        RETURN r;
    END IF;
    r.amount_micros := f.charge_micros;
    IF p_cap IS NOT NULL AND r.amount_micros > p_cap THEN
        r.amount_micros := p_cap;
        r.required_micros := f.charge_micros;
    END IF;
    IF b.balance_micros - b.held_micros - r.amount_micros < b.floor_micros THEN
        r.code := 'insufficient_credits';
        r.required_micros := r.amount_micros;
        r.amount_micros := NULL;
        RETURN r;
    END IF;
    r.hold_id := 'hold_' || replace(gen_random_uuid()::text, '-', '');
    r.expires_at := now() + make_interval(secs => p_ttl_seconds);
    INSERT INTO holds (id, account_id, feature_id, agent_id, quantity, amount_micros, expires_at, idempotency_key,
                       request_hash, metadata)
        VALUES (r.hold_id, p_account, p_feature, p_agent, p_quantity, r.amount_micros, r.expires_at, p_key, p_hash,
                p_metadata);
    UPDATE balances SET held_micros = held_micros + r.amount_micros, updated_at = now() WHERE account_id = p_account;
    r.held_micros := b.held_micros + r.amount_micros;
    r.allowed := true;
    r.code := 'ok';
    r.status := 'active';
    RETURN r;
END $$;

CREATE OR REPLACE FUNCTION cf_hold_unchecked(
    p_account text, p_feature text, p_quantity numeric, p_agent text, p_ttl_seconds integer,
    p_key text, p_hash bytea, p_metadata jsonb
) RETURNS cf_hold_result LANGUAGE sql AS $$
    SELECT * FROM cf_hold_reserve(p_account, p_feature, p_quantity, p_agent, p_ttl_seconds, p_key, p_hash, p_metadata,
                                  NULL, NULL)
$$;

-- As in 0013, plus a stop agent's cap (the plan credits available to it) and its plan-rate decision.
CREATE OR REPLACE FUNCTION cf_hold(
    p_account text, p_feature text, p_quantity numeric, p_agent text, p_ttl_seconds integer,
    p_key text, p_hash bytea, p_metadata jsonb
) RETURNS cf_hold_result LANGUAGE plpgsql AS $$
DECLARE
    r cf_hold_result;
    b record;
    f cf_price_result;
    v_gate text;
    s cf_agent_plan_state;
    v_cap bigint;
    v_in_plan boolean;
BEGIN
    SELECT balance_micros, held_micros, floor_micros, controlled, plan_id, plan_left_micros, agent_controls INTO b
        FROM balances WHERE account_id = p_account FOR UPDATE;
    IF FOUND AND b.controlled
            AND NOT EXISTS (SELECT 1 FROM holds WHERE account_id = p_account AND idempotency_key = p_key) THEN
        IF b.held_micros > 0 THEN
            PERFORM cf_expire_holds(p_account);
            SELECT balance_micros, held_micros, floor_micros, controlled, plan_id, plan_left_micros, agent_controls
                INTO b FROM balances WHERE account_id = p_account;
        END IF;
        IF b.plan_id IS NOT NULL AND p_agent IS NOT NULL AND b.agent_controls THEN
            s := cf_agent_plan(p_account, p_agent);
            v_in_plan := b.plan_left_micros > 0 AND coalesce(s.room, 1) > 0;
            IF s.stop THEN
                v_cap := least(greatest(0, b.plan_left_micros - b.held_micros), coalesce(s.room, b.plan_left_micros));
            END IF;
        END IF;
        f := cf_plan_price(cf_price(p_feature, p_quantity), b.plan_id, p_feature, p_quantity,
                           coalesce(v_in_plan, b.plan_left_micros > 0));
        IF f.code = 'ok' THEN
            v_gate := cf_spend_gate(p_account, p_agent,
                                    CASE WHEN v_cap > 0 THEN least(f.charge_micros, v_cap) ELSE f.charge_micros END);
            IF v_gate <> 'ok' THEN
                r.allowed := false;
                r.replayed := false;
                r.code := v_gate;
                r.required_micros := f.charge_micros;
                r.balance_micros := b.balance_micros;
                r.held_micros := b.held_micros;
                r.floor_micros := b.floor_micros;
                RETURN r;
            END IF;
        END IF;
    END IF;
    RETURN cf_hold_reserve(p_account, p_feature, p_quantity, p_agent, p_ttl_seconds, p_key, p_hash, p_metadata,
                           v_cap, v_in_plan);
END $$;
