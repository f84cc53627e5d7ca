-- The ledger's write paths as PL/pgSQL so a usage event is ONE round trip and one short
-- transaction. The rules mirror creditflow.domain (money rounding, burn order); tests keep them in step.
-- Every function that writes an account's money first locks that account's balances row.

CREATE FUNCTION cf_id(prefix text) RETURNS text LANGUAGE sql VOLATILE AS $$
    SELECT prefix || '_' || replace(gen_random_uuid()::text, '-', '')
$$;

-- Journal and balance rows are append-only: mistakes are corrected by reversing entries.
CREATE FUNCTION cf_forbid_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only', TG_TABLE_NAME USING ERRCODE = 'CF500';
END $$;
CREATE TRIGGER journal_transactions_append_only BEFORE UPDATE OR DELETE ON journal_transactions
    FOR EACH ROW EXECUTE FUNCTION cf_forbid_change();
CREATE TRIGGER journal_entries_append_only BEFORE UPDATE OR DELETE ON journal_entries
    FOR EACH ROW EXECUTE FUNCTION cf_forbid_change();

-- Every journal transaction sums to zero, checked at commit.
CREATE FUNCTION cf_check_txn_balanced() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (SELECT sum(amount_micros) FROM journal_entries WHERE txn_id = NEW.txn_id) <> 0 THEN
        RAISE EXCEPTION 'journal transaction % does not balance', NEW.txn_id USING ERRCODE = 'CF500';
    END IF;
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER journal_entries_balanced AFTER INSERT ON journal_entries
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION cf_check_txn_balanced();

CREATE FUNCTION cf_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('creditflow_outbox', NEW.account_id);
    RETURN NULL;
END $$;
CREATE TRIGGER outbox_notify AFTER INSERT ON outbox FOR EACH ROW EXECUTE FUNCTION cf_outbox_notify();

-- The rate in force for a feature at a time: its own latest rate, plus its base feature's.
-- NULL when the feature (or its base) has no rate yet: such a feature is not usable.
CREATE FUNCTION cf_rate(p_feature text, p_at timestamptz) RETURNS numeric LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_base text;
    v_own numeric;
    v_base_rate numeric;
BEGIN
    SELECT base_feature_id INTO v_base FROM features WHERE id = p_feature;
    SELECT credits_per_unit INTO v_own FROM feature_rates
        WHERE feature_id = p_feature AND effective_at <= p_at ORDER BY effective_at DESC LIMIT 1;
    IF v_base IS NULL OR v_own IS NULL THEN
        RETURN v_own;
    END IF;
    SELECT credits_per_unit INTO v_base_rate FROM feature_rates
        WHERE feature_id = v_base AND effective_at <= p_at ORDER BY effective_at DESC LIMIT 1;
    RETURN v_own + v_base_rate;  -- NULL when the base has no rate
END $$;

-- The single rounding rule (creditflow.domain.money.usage_charge_micros): half-up to the micro.
CREATE FUNCTION cf_charge_micros(p_quantity numeric, p_rate numeric) RETURNS bigint
    LANGUAGE sql IMMUTABLE AS $$ SELECT round(p_quantity * p_rate * 1000000)::bigint $$;

-- Burn lots in order (creditflow.domain.lots): plan, promotional, purchased; earliest expiry
-- first; oldest first. Returns the part not covered by lots (drawn on the overage credit line).
-- Caller holds the account's balances row lock, which serializes every lot writer.
CREATE FUNCTION cf_burn_lots(p_account text, p_amount bigint) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    v_left bigint := p_amount;
    v_lot record;
    v_take bigint;
BEGIN
    IF v_left <= 0 THEN
        RETURN 0;
    END IF;
    FOR v_lot IN
        SELECT id, remaining_micros FROM credit_lots
        WHERE account_id = p_account AND remaining_micros > 0
        ORDER BY priority, expires_at NULLS LAST, created_at, id
    LOOP
        v_take := least(v_lot.remaining_micros, v_left);
        UPDATE credit_lots SET remaining_micros = remaining_micros - v_take WHERE id = v_lot.id;
        v_left := v_left - v_take;
        EXIT WHEN v_left = 0;
    END LOOP;
    RETURN v_left;
END $$;

-- Holds past their expiry stop reserving credits. Caller holds the balances row lock.
CREATE FUNCTION cf_expire_holds(p_account text) RETURNS bigint LANGUAGE plpgsql AS $$
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

-- Held credits that still reserve (expired holds excluded even before a writer or the sweeper
-- marks them): what reads should report without taking the account lock.
CREATE FUNCTION cf_live_held(p_account text, p_held bigint) RETURNS bigint LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN p_held = 0 THEN 0::bigint ELSE p_held - coalesce((
        SELECT sum(amount_micros) FROM holds
        WHERE account_id = p_account AND status = 'active' AND expires_at <= now()), 0)::bigint END
$$;

-- A movement of credits between the customer's wallet and a system book, as one balanced
-- journal transaction. Positive amounts grant a lot (source/priority/expiry); negative amounts
-- burn lots and respect the floor unless p_enforce_floor is false.
CREATE FUNCTION cf_post(
    p_account text, p_type text, p_amount bigint, p_book text, p_description text,
    p_metadata jsonb, p_lot_source text, p_lot_priority integer, p_lot_expires_at timestamptz,
    p_enforce_floor boolean
) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    b balances%ROWTYPE;
    v_txn text := cf_id('txn');
    v_new bigint;
    v_lot text;
BEGIN
    IF p_amount = 0 THEN
        RAISE EXCEPTION 'invalid_amount' USING ERRCODE = 'CF400';
    END IF;
    SELECT * INTO b FROM balances WHERE account_id = p_account FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown_account' USING ERRCODE = 'CF404';
    END IF;
    v_new := b.balance_micros + p_amount;
    IF p_amount < 0 AND p_enforce_floor AND v_new - b.held_micros < b.floor_micros THEN
        RAISE EXCEPTION 'insufficient_credits' USING ERRCODE = 'CF402';
    END IF;
    INSERT INTO journal_transactions (id, account_id, type, amount_micros, balance_after_micros, description, metadata)
        VALUES (v_txn, p_account, p_type, p_amount, v_new, p_description, coalesce(p_metadata, '{}'::jsonb));
    INSERT INTO journal_entries (txn_id, book, account_id, amount_micros)
        VALUES (v_txn, 'wallet', p_account, p_amount), (v_txn, p_book, NULL, -p_amount);
    IF p_amount > 0 THEN
        v_lot := cf_id('lot');
        -- A grant first repays any overage drawn: the lot keeps only what ends up above zero.
        INSERT INTO credit_lots (id, account_id, source, priority, original_micros, remaining_micros,
                                 expires_at, txn_id, metadata)
            VALUES (v_lot, p_account, p_lot_source, p_lot_priority, p_amount,
                    greatest(0, least(p_amount, v_new)), p_lot_expires_at, v_txn, coalesce(p_metadata, '{}'::jsonb));
    ELSE
        PERFORM cf_burn_lots(p_account, -p_amount);
    END IF;
    UPDATE balances SET balance_micros = v_new, updated_at = now() WHERE account_id = p_account;
    RETURN jsonb_build_object(
        'transaction_id', v_txn, 'lot_id', v_lot, 'amount_micros', p_amount,
        'balance_micros', v_new, 'held_micros', b.held_micros, 'floor_micros', b.floor_micros);
END $$;

-- The metering hot path: one call, one transaction. Dedupe by key (after taking the account
-- lock, so concurrent duplicates see each other), rate, floor check, burn, journal, usage item.
-- Denials write nothing and return a reason code; they are not stored under the key.
CREATE FUNCTION cf_track(
    p_account text, p_feature text, p_quantity numeric, p_agent text, p_key text,
    p_hash text, p_metadata jsonb
) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    b balances%ROWTYPE;
    v_idem record;
    f record;
    v_rate numeric;
    v_charge bigint;
    v_new bigint;
    v_txn text;
    v_item text;
    v_resp jsonb;
BEGIN
    SELECT * INTO b FROM balances WHERE account_id = p_account FOR UPDATE;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('allowed', false, 'code', 'unknown_account');
    END IF;
    SELECT request_hash, response INTO v_idem FROM idempotency_keys
        WHERE account_id = p_account AND key = p_key;
    IF FOUND THEN
        IF v_idem.request_hash = p_hash THEN
            RETURN v_idem.response || '{"replayed": true}'::jsonb;
        END IF;
        RETURN jsonb_build_object('allowed', false, 'code', 'idempotency_conflict');
    END IF;
    IF b.held_micros > 0 AND cf_expire_holds(p_account) > 0 THEN
        SELECT * INTO b FROM balances WHERE account_id = p_account;
    END IF;

    SELECT id, name, channel, integer_only INTO f FROM features WHERE id = p_feature;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('allowed', false, 'code', 'unknown_feature');
    END IF;
    IF f.integer_only AND p_quantity <> trunc(p_quantity) THEN
        RETURN jsonb_build_object('allowed', false, 'code', 'invalid_quantity');
    END IF;
    v_rate := cf_rate(p_feature, now());
    IF v_rate IS NULL THEN
        RETURN jsonb_build_object('allowed', false, 'code', 'feature_not_priced');
    END IF;
    v_charge := cf_charge_micros(p_quantity, v_rate);
    v_new := b.balance_micros - v_charge;
    IF v_new - b.held_micros < b.floor_micros THEN
        RETURN jsonb_build_object(
            'allowed', false, 'code', 'insufficient_credits', 'credits_required_micros', v_charge,
            'balance_micros', b.balance_micros, 'held_micros', b.held_micros, 'floor_micros', b.floor_micros);
    END IF;

    PERFORM cf_burn_lots(p_account, v_charge);
    v_txn := cf_id('txn');
    v_item := cf_id('ui');
    INSERT INTO journal_transactions (id, account_id, type, amount_micros, balance_after_micros, description, metadata)
        VALUES (v_txn, p_account, 'usage', -v_charge, v_new,
                f.name || coalesce(': ' || p_agent, ''),
                jsonb_build_object('feature_id', p_feature, 'quantity', trim_scale(p_quantity)::text, 'credits_per_unit', trim_scale(v_rate)::text,
                                   'agent_id', p_agent, 'usage_item_id', v_item)
                || coalesce(p_metadata, '{}'::jsonb));
    INSERT INTO journal_entries (txn_id, book, account_id, amount_micros)
        VALUES (v_txn, 'wallet', p_account, -v_charge), (v_txn, 'system:usage_revenue', NULL, v_charge);
    INSERT INTO usage_items (id, account_id, feature_id, channel, quantity, credits_per_unit, credits_micros,
                             agent_id, txn_id, metadata)
        VALUES (v_item, p_account, p_feature, f.channel, p_quantity, v_rate, v_charge, p_agent, v_txn,
                coalesce(p_metadata, '{}'::jsonb));
    UPDATE balances SET balance_micros = v_new, updated_at = now() WHERE account_id = p_account;

    v_resp := jsonb_build_object(
        'allowed', true, 'code', 'ok', 'credits_charged_micros', v_charge, 'balance_micros', v_new,
        'held_micros', b.held_micros, 'floor_micros', b.floor_micros, 'transaction_id', v_txn,
        'usage_item_id', v_item, 'credits_per_unit', trim_scale(v_rate)::text);
    INSERT INTO idempotency_keys (account_id, key, request_hash, response) VALUES (p_account, p_key, p_hash, v_resp);
    RETURN v_resp;
END $$;

-- Reserve credits for long-running usage (a call): priced like track, not spendable meanwhile.
CREATE FUNCTION cf_hold(
    p_account text, p_feature text, p_quantity numeric, p_agent text, p_ttl_seconds integer,
    p_key text, p_hash text, p_metadata jsonb
) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    b balances%ROWTYPE;
    v_idem record;
    f record;
    v_rate numeric;
    v_amount bigint;
    v_hold text;
    v_resp jsonb;
BEGIN
    SELECT * INTO b FROM balances WHERE account_id = p_account FOR UPDATE;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('allowed', false, 'code', 'unknown_account');
    END IF;
    SELECT request_hash, response INTO v_idem FROM idempotency_keys WHERE account_id = p_account AND key = p_key;
    IF FOUND THEN
        IF v_idem.request_hash = p_hash THEN
            RETURN v_idem.response || '{"replayed": true}'::jsonb;
        END IF;
        RETURN jsonb_build_object('allowed', false, 'code', 'idempotency_conflict');
    END IF;
    IF b.held_micros > 0 AND cf_expire_holds(p_account) > 0 THEN
        SELECT * INTO b FROM balances WHERE account_id = p_account;
    END IF;
    SELECT id, integer_only INTO f FROM features WHERE id = p_feature;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('allowed', false, 'code', 'unknown_feature');
    END IF;
    IF f.integer_only AND p_quantity <> trunc(p_quantity) THEN
        RETURN jsonb_build_object('allowed', false, 'code', 'invalid_quantity');
    END IF;
    v_rate := cf_rate(p_feature, now());
    IF v_rate IS NULL THEN
        RETURN jsonb_build_object('allowed', false, 'code', 'feature_not_priced');
    END IF;
    v_amount := cf_charge_micros(p_quantity, v_rate);
    IF b.balance_micros - b.held_micros - v_amount < b.floor_micros THEN
        RETURN jsonb_build_object(
            'allowed', false, 'code', 'insufficient_credits', 'credits_required_micros', v_amount,
            'balance_micros', b.balance_micros, 'held_micros', b.held_micros, 'floor_micros', b.floor_micros);
    END IF;
    v_hold := cf_id('hold');
    INSERT INTO holds (id, account_id, feature_id, agent_id, quantity, amount_micros, expires_at, metadata)
        VALUES (v_hold, p_account, p_feature, p_agent, p_quantity, v_amount,
                now() + make_interval(secs => p_ttl_seconds), coalesce(p_metadata, '{}'::jsonb));
    UPDATE balances SET held_micros = held_micros + v_amount, updated_at = now() WHERE account_id = p_account;
    v_resp := jsonb_build_object(
        'allowed', true, 'code', 'ok', 'hold_id', v_hold, 'held_amount_micros', v_amount,
        'balance_micros', b.balance_micros, 'held_micros', b.held_micros + v_amount,
        'floor_micros', b.floor_micros, 'expires_at', now() + make_interval(secs => p_ttl_seconds));
    INSERT INTO idempotency_keys (account_id, key, request_hash, response) VALUES (p_account, p_key, p_hash, v_resp);
    RETURN v_resp;
END $$;

-- Settle a hold with the actual quantity: release the reservation and charge the actual usage
-- through cf_track (key 'hold:<id>'), atomically. Settling twice returns the first result.
-- A hold that already expired is still charged (the usage happened), subject to the floor.
CREATE FUNCTION cf_hold_settle(p_account text, p_hold text, p_quantity numeric, p_metadata jsonb)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    h holds%ROWTYPE;
    v_resp jsonb;
BEGIN
    PERFORM 1 FROM balances WHERE account_id = p_account FOR UPDATE;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('allowed', false, 'code', 'unknown_account');
    END IF;
    SELECT * INTO h FROM holds WHERE id = p_hold AND account_id = p_account;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('allowed', false, 'code', 'unknown_hold');
    END IF;
    IF h.status = 'settled' THEN
        RETURN h.result || '{"replayed": true}'::jsonb;
    END IF;
    IF h.status = 'released' THEN
        RETURN jsonb_build_object('allowed', false, 'code', 'hold_released');
    END IF;
    IF h.status = 'active' THEN
        UPDATE balances SET held_micros = held_micros - h.amount_micros WHERE account_id = p_account;
    END IF;
    v_resp := cf_track(p_account, h.feature_id, p_quantity, h.agent_id, 'hold:' || p_hold,
                       'hold:' || p_hold || ':' || p_quantity::text,
                       coalesce(p_metadata, '{}'::jsonb) || jsonb_build_object('hold_id', p_hold));
    IF (v_resp ->> 'allowed')::boolean THEN
        v_resp := v_resp - 'replayed' || jsonb_build_object('hold_id', p_hold, 'released_micros',
                  greatest(0, h.amount_micros - (v_resp ->> 'credits_charged_micros')::bigint));
        UPDATE holds SET status = 'settled', closed_at = now(), result = v_resp WHERE id = p_hold;
    ELSIF h.status = 'active' THEN
        UPDATE balances SET held_micros = held_micros + h.amount_micros WHERE account_id = p_account;
    END IF;
    RETURN v_resp;
END $$;

CREATE FUNCTION cf_hold_release(p_account text, p_hold text) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    h holds%ROWTYPE;
BEGIN
    PERFORM 1 FROM balances WHERE account_id = p_account FOR UPDATE;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('allowed', false, 'code', 'unknown_account');
    END IF;
    SELECT * INTO h FROM holds WHERE id = p_hold AND account_id = p_account;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('allowed', false, 'code', 'unknown_hold');
    END IF;
    IF h.status = 'active' THEN
        UPDATE balances SET held_micros = held_micros - h.amount_micros, updated_at = now()
            WHERE account_id = p_account;
        UPDATE holds SET status = 'released', closed_at = now() WHERE id = p_hold;
        h.status := 'released';
    END IF;
    IF h.status = 'settled' THEN
        RETURN jsonb_build_object('allowed', false, 'code', 'hold_settled', 'hold_id', p_hold);
    END IF;
    RETURN jsonb_build_object('allowed', true, 'code', 'ok', 'hold_id', p_hold, 'status', h.status,
                              'released_micros', h.amount_micros);
END $$;

-- Sweep: expire overdue holds of every account (the worker calls this periodically).
CREATE FUNCTION cf_expire_all_holds() RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    v_account text;
    v_total bigint := 0;
BEGIN
    FOR v_account IN SELECT DISTINCT account_id FROM holds WHERE status = 'active' AND expires_at <= now() LOOP
        PERFORM 1 FROM balances WHERE account_id = v_account FOR UPDATE;
        v_total := v_total + cf_expire_holds(v_account);
    END LOOP;
    RETURN v_total;
END $$;
