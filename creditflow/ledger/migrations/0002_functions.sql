-- The ledger's write paths as PL/pgSQL so a usage event is ONE round trip and one short
-- transaction. The rules mirror creditflow.domain (rounding in money.usage_charge_micros, burn
-- order in lots.plan_burn); property tests keep them in step.
-- Every function that writes an account's money locks that account's balances row first.

CREATE TYPE cf_track_result AS (
    allowed          boolean,
    code             text,
    txn_id           uuid,
    charged_micros   bigint,
    credits_per_unit numeric,
    balance_micros   bigint,
    held_micros      bigint,
    floor_micros     bigint,
    required_micros  bigint,
    replayed         boolean,
    hold_id          text,
    released_micros  bigint
);

CREATE TYPE cf_hold_result AS (
    allowed          boolean,
    code             text,
    hold_id          text,
    amount_micros    bigint,
    status           text,
    expires_at       timestamptz,
    balance_micros   bigint,
    held_micros      bigint,
    floor_micros     bigint,
    required_micros  bigint,
    replayed         boolean,
    released_micros  bigint
);

CREATE TYPE cf_post_result AS (
    txn_id          uuid,
    amount_micros   bigint,
    balance_micros  bigint,
    held_micros     bigint,
    floor_micros    bigint,
    lot_id          text,
    replayed        boolean
);

-- The journal is append-only: mistakes are corrected by reversing entries.
CREATE FUNCTION cf_forbid_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only', TG_TABLE_NAME USING ERRCODE = 'CF500';
END $$;
CREATE TRIGGER journal_append_only BEFORE UPDATE OR DELETE ON journal
    FOR EACH ROW EXECUTE FUNCTION cf_forbid_change();
CREATE TRIGGER journal_no_truncate BEFORE TRUNCATE ON journal
    FOR EACH STATEMENT EXECUTE FUNCTION cf_forbid_change();

CREATE FUNCTION cf_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('creditflow_outbox', NEW.account_id);
    RETURN NULL;
END $$;
CREATE TRIGGER outbox_notify AFTER INSERT ON outbox FOR EACH ROW EXECUTE FUNCTION cf_outbox_notify();

-- The single rounding rule (creditflow.domain.money.usage_charge_micros): half-up to the micro.
CREATE FUNCTION cf_charge_micros(p_quantity numeric, p_rate numeric) RETURNS bigint
    LANGUAGE sql IMMUTABLE AS $$ SELECT round(p_quantity * p_rate * 1000000)::bigint $$;

-- Price a usage quantity with the rate in force now: the one place that says whether an event
-- can be priced (unknown feature, a fraction of a whole unit, no rate yet, absurdly large) and what
-- it costs (rounded as cf_charge_micros). Used by track, batch and holds.
CREATE TYPE cf_price_result AS (
    code              text,
    name              text,
    channel           text,
    credits_per_unit  numeric,
    charge_micros     bigint
);

CREATE FUNCTION cf_price(p_feature text, p_quantity numeric) RETURNS cf_price_result
LANGUAGE plpgsql STABLE AS $$
DECLARE
    f record;
    r cf_price_result;
BEGIN
    SELECT name, channel, integer_only, credits_per_unit INTO f FROM feature_prices WHERE id = p_feature;
    IF NOT FOUND THEN
        r.code := 'unknown_feature';
        RETURN r;
    END IF;
    r.name := f.name;
    r.channel := f.channel;
    r.credits_per_unit := f.credits_per_unit;
    IF p_quantity IS NULL OR p_quantity <= 0 THEN
        r.code := 'invalid_quantity';  -- the library validates first; this guards direct SQL callers
    ELSIF f.integer_only AND p_quantity <> trunc(p_quantity) THEN
        r.code := 'invalid_quantity';
    ELSIF f.credits_per_unit IS NULL THEN
        r.code := 'feature_not_priced';
    ELSIF round(p_quantity * f.credits_per_unit * 1000000) > 1000000000000000 THEN
        r.code := 'amount_too_large';  -- over 1e9 credits in one event
    ELSE
        r.code := 'ok';
        r.charge_micros := cf_charge_micros(p_quantity, f.credits_per_unit);
    END IF;
    RETURN r;
END $$;

-- Burn lots in order (creditflow.domain.lots): plan, promotional, purchased; earliest expiry
-- first; oldest first. Callers pass only the part of a debit that is above zero (the rest is
-- drawn on the overage credit line), so the lots always hold exactly max(balance, 0).
-- Caller holds the account's balances row lock, which serializes every lot writer.
CREATE FUNCTION cf_burn(p_account text, p_amount bigint) RETURNS void LANGUAGE plpgsql AS $$
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
CREATE FUNCTION cf_settle_burns(p_account text) RETURNS bigint LANGUAGE plpgsql AS $$
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
CREATE FUNCTION cf_settle_account_burns(p_account text) RETURNS bigint LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM balances WHERE account_id = p_account FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    RETURN cf_settle_burns(p_account);
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

-- Held credits that still reserve (overdue holds excluded even before a writer or the sweeper
-- marks them): what reads report without taking the account lock.
CREATE FUNCTION cf_live_held(p_account text, p_held bigint) RETURNS bigint LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN p_held = 0 THEN 0::bigint ELSE p_held - coalesce((
        SELECT sum(amount_micros) FROM holds
        WHERE account_id = p_account AND status = 'active' AND expires_at <= now()), 0)::bigint END
$$;

-- Sweep one account's overdue holds in its own short transaction (the worker drives it per
-- account, in id order, so a failure stays with that account and locks never pile up).
CREATE FUNCTION cf_expire_account_holds(p_account text) RETURNS bigint LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM balances WHERE account_id = p_account FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    RETURN cf_expire_holds(p_account);
END $$;

-- A movement between the wallet and a system book (grants, purchases, adjustments, refunds):
-- one journal row, idempotent by key. Positive amounts grant a lot (source/priority/expiry);
-- negative amounts burn lots and never take the balance below its floor.
CREATE FUNCTION cf_post(
    p_account text, p_type text, p_amount bigint, p_counter_book text, p_description text,
    p_metadata jsonb, p_lot_source text, p_lot_priority integer, p_lot_expires_at timestamptz,
    p_key text, p_hash bytea
) RETURNS cf_post_result LANGUAGE plpgsql AS $$
DECLARE
    r cf_post_result;
    b record;
    j record;
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
        FROM journal WHERE account_id = p_account AND idempotency_key = p_key;
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
    IF p_amount > 0 THEN
        r.lot_id := 'lot_' || replace(gen_random_uuid()::text, '-', '');
        -- A grant first repays any overage drawn: the lot keeps only what ends up above zero.
        INSERT INTO credit_lots (id, account_id, source, priority, original_micros, remaining_micros,
                                 depleted, expires_at, txn_id)
            VALUES (r.lot_id, p_account, p_lot_source, p_lot_priority, p_amount,
                    greatest(0, least(p_amount, r.balance_micros)), r.balance_micros <= 0, p_lot_expires_at,
                    r.txn_id);
    ELSE
        PERFORM cf_burn(p_account, least(-p_amount, greatest(b.balance_micros, 0)));
    END IF;
    UPDATE balances SET balance_micros = r.balance_micros, updated_at = now() WHERE account_id = p_account;
    RETURN r;
END $$;

-- The metering hot path: one call, one short transaction, one journal row.
--  1. a key seen before replays its transaction (same request) or conflicts (different request);
--     a concurrent duplicate is stopped by the unique index (the caller retries and replays);
--  2. price the event with the rate in force;
--  3. take the account lock, check the floor and debit in one UPDATE (the lots are burned later,
--     in order, by cf_settle_burns: no lot row is written per event);
--  4. write the journal row (which is also the usage item).
-- Denials write nothing (overdue holds may be expired on the way) and return a reason code.
-- p_probe = false skips step 1 (the client's first attempt): a key seen before then fails on the
-- unique index, and the client retries with p_probe = true to replay or report the conflict.
CREATE FUNCTION cf_track(
    p_account text, p_feature text, p_quantity numeric, p_agent text, p_key text,
    p_hash bytea, p_metadata jsonb, p_probe boolean DEFAULT true
) RETURNS cf_track_result LANGUAGE plpgsql AS $$
DECLARE
    r cf_track_result;
    f cf_price_result;
    j record;
    b record;
BEGIN
    r.allowed := false;
    r.replayed := false;
    r.charged_micros := 0;
    IF p_probe THEN
        SELECT id, request_hash, amount_micros, balance_after_micros, credits_per_unit INTO j
            FROM journal WHERE account_id = p_account AND idempotency_key = p_key;
    END IF;
    IF p_probe AND FOUND THEN
        IF j.request_hash IS DISTINCT FROM p_hash THEN
            r.code := 'idempotency_conflict';
            RETURN r;
        END IF;
        SELECT held_micros, floor_micros INTO r.held_micros, r.floor_micros FROM balances WHERE account_id = p_account;
        r.allowed := true;
        r.code := 'ok';
        r.replayed := true;
        r.txn_id := j.id;
        r.charged_micros := -j.amount_micros;
        r.credits_per_unit := j.credits_per_unit;
        r.balance_micros := j.balance_after_micros;
        RETURN r;
    END IF;

    f := cf_price(p_feature, p_quantity);
    IF f.code <> 'ok' THEN
        r.code := f.code;
        RETURN r;
    END IF;
    r.credits_per_unit := f.credits_per_unit;
    r.charged_micros := f.charge_micros;

    -- Lock, floor check and debit in one statement; the part above zero is owed to the lots
    -- (burned later by cf_settle_burns, in burn order), the rest is drawn on the overage line.
    UPDATE balances SET balance_micros = balance_micros - r.charged_micros,
                        unburned_micros = unburned_micros + least(r.charged_micros, greatest(balance_micros, 0)),
                        updated_at = now()
        WHERE account_id = p_account AND balance_micros - held_micros - r.charged_micros >= floor_micros
        RETURNING balance_micros, held_micros, floor_micros INTO r.balance_micros, r.held_micros, r.floor_micros;
    IF NOT FOUND THEN
        -- Unknown account, overdue holds still reserving, or not enough credits.
        SELECT balance_micros, held_micros, floor_micros INTO b
            FROM balances WHERE account_id = p_account FOR UPDATE;
        IF NOT FOUND THEN
            r.code := 'unknown_account';
            r.charged_micros := 0;
            RETURN r;
        END IF;
        IF b.held_micros > 0 AND cf_expire_holds(p_account) > 0 THEN
            SELECT balance_micros, held_micros, floor_micros INTO b FROM balances WHERE account_id = p_account;
        END IF;
        IF b.balance_micros - b.held_micros - r.charged_micros < b.floor_micros THEN
            r.code := 'insufficient_credits';
            r.required_micros := r.charged_micros;
            r.charged_micros := 0;
            r.balance_micros := b.balance_micros;
            r.held_micros := b.held_micros;
            r.floor_micros := b.floor_micros;
            RETURN r;
        END IF;
        UPDATE balances SET balance_micros = balance_micros - r.charged_micros,
                            unburned_micros = unburned_micros + least(r.charged_micros, greatest(balance_micros, 0)),
                            updated_at = now()
            WHERE account_id = p_account
            RETURNING balance_micros, held_micros, floor_micros INTO r.balance_micros, r.held_micros, r.floor_micros;
    END IF;

    INSERT INTO journal (account_id, type, amount_micros, counter_book, balance_after_micros, description,
                         feature_id, channel, quantity, credits_per_unit, agent_id, idempotency_key,
                         request_hash, metadata)
        VALUES (p_account, 'usage', -r.charged_micros, 'system:usage_revenue', r.balance_micros,
                f.name || coalesce(': ' || p_agent, ''), p_feature, f.channel, p_quantity, f.credits_per_unit,
                p_agent, p_key, p_hash, p_metadata)
        RETURNING id INTO r.txn_id;
    r.allowed := true;
    r.code := 'ok';
    RETURN r;
END $$;

-- Many events in one call and one transaction, decided one by one in input order per account,
-- written set-based: one INSERT for all journal rows, one UPDATE per account (what the lots owe is
-- added to unburned_micros, as in cf_track). Accounts are locked in id order, so
-- concurrent batches cannot deadlock. A key repeated inside the batch behaves as if the events
-- came one by one: it replays the event recorded under it (denials record nothing).
CREATE FUNCTION cf_track_batch(
    p_accounts text[], p_features text[], p_quantities numeric[], p_agents text[], p_keys text[],
    p_hashes bytea[], p_metadata jsonb[]
) RETURNS SETOF cf_track_result LANGUAGE plpgsql
-- Custom plans for array parameters are re-planned on every call (~0.3 ms); the generic plan is as good.
SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    n integer := cardinality(p_accounts);
    res cf_track_result[] := array_fill(NULL::cf_track_result, ARRAY[n]);
    r cf_track_result;
    e record;
    v_account text;
    v_balance bigint;
    v_held bigint;
    v_floor bigint;
    v_total bigint := 0;
    v_burn bigint := 0;
    v_charge bigint;
    v_seen integer;
    rep_keys text[] := '{}';
    rep_ords integer[] := '{}';
    acc_ids text[] := '{}';
    acc_totals bigint[] := '{}';
    acc_burns bigint[] := '{}';
    ins_id uuid[] := '{}';
    ins_account text[] := '{}';
    ins_amount bigint[] := '{}';
    ins_balance bigint[] := '{}';
    ins_desc text[] := '{}';
    ins_feature text[] := '{}';
    ins_channel text[] := '{}';
    ins_quantity numeric[] := '{}';
    ins_rate numeric[] := '{}';
    ins_agent text[] := '{}';
    ins_key text[] := '{}';
    ins_hash bytea[] := '{}';
    ins_meta jsonb[] := '{}';
BEGIN
    IF n IS NULL OR n = 0 THEN
        RETURN;
    END IF;
    PERFORM 1 FROM balances WHERE account_id = ANY (p_accounts) ORDER BY account_id FOR UPDATE;
    PERFORM cf_expire_holds(account_id) FROM balances WHERE account_id = ANY (p_accounts) AND held_micros > 0;

    FOR e IN
        SELECT ev.ord::integer AS ord, ev.account_id, ev.feature_id, ev.quantity, ev.agent_id, ev.key, ev.hash,
               ev.metadata,
               count(*) OVER (PARTITION BY ev.account_id, ev.key) > 1 AS repeated,
               p.code AS price_code, p.name, p.channel, p.credits_per_unit AS rate, p.charge_micros,
               j.id AS prior_id, j.request_hash AS prior_hash, j.amount_micros AS prior_amount,
               j.balance_after_micros AS prior_balance, j.credits_per_unit AS prior_rate,
               b.balance_micros, b.held_micros, b.floor_micros
        FROM unnest(p_accounts, p_features, p_quantities, p_agents, p_keys, p_hashes, p_metadata)
             WITH ORDINALITY AS ev (account_id, feature_id, quantity, agent_id, key, hash, metadata, ord)
        CROSS JOIN LATERAL cf_price(ev.feature_id, ev.quantity) AS p
        LEFT JOIN journal j ON j.account_id = ev.account_id AND j.idempotency_key = ev.key
        LEFT JOIN balances b ON b.account_id = ev.account_id
        ORDER BY ev.account_id, ev.ord
    LOOP
        IF v_account IS DISTINCT FROM e.account_id THEN
            IF v_total > 0 THEN
                acc_ids := acc_ids || v_account;
                acc_totals := acc_totals || v_total;
                acc_burns := acc_burns || v_burn;
            END IF;
            v_account := e.account_id;
            v_balance := e.balance_micros;
            v_held := e.held_micros;
            v_floor := e.floor_micros;
            v_total := 0;
            v_burn := 0;
            rep_keys := '{}';
            rep_ords := '{}';
        END IF;
        r := ROW(false, NULL, NULL, 0, NULL, v_balance, v_held, v_floor, NULL, false, NULL, NULL)::cf_track_result;
        v_seen := CASE WHEN e.repeated AND e.prior_id IS NULL THEN array_position(rep_keys, e.key) END;
        IF v_seen IS NOT NULL THEN
            -- Recorded earlier in this batch under the same key.
            IF p_hashes[rep_ords[v_seen]] IS DISTINCT FROM e.hash THEN
                r.code := 'idempotency_conflict';
            ELSE
                r := res[rep_ords[v_seen]];
                r.replayed := true;
            END IF;
        ELSIF e.prior_id IS NOT NULL THEN
            IF e.prior_hash IS DISTINCT FROM e.hash THEN
                r.code := 'idempotency_conflict';
            ELSE
                r.allowed := true;
                r.code := 'ok';
                r.replayed := true;
                r.txn_id := e.prior_id;
                r.charged_micros := -e.prior_amount;
                r.credits_per_unit := e.prior_rate;
                r.balance_micros := e.prior_balance;
            END IF;
        ELSIF e.price_code <> 'ok' THEN
            r.code := e.price_code;
        ELSIF e.balance_micros IS NULL THEN
            r.code := 'unknown_account';
        ELSE
            v_charge := e.charge_micros;
            r.credits_per_unit := e.rate;
            IF v_balance - v_held - v_charge < v_floor THEN
                r.code := 'insufficient_credits';
                r.required_micros := v_charge;
            ELSE
                v_burn := v_burn + least(v_charge, greatest(v_balance, 0));
                v_balance := v_balance - v_charge;
                v_total := v_total + v_charge;
                r.allowed := true;
                r.code := 'ok';
                r.txn_id := gen_random_uuid();
                r.charged_micros := v_charge;
                r.balance_micros := v_balance;
                ins_id := ins_id || r.txn_id;
                ins_account := ins_account || e.account_id;
                ins_amount := ins_amount || -v_charge;
                ins_balance := ins_balance || v_balance;
                ins_desc := ins_desc || (e.name || coalesce(': ' || e.agent_id, ''));
                ins_feature := ins_feature || e.feature_id;
                ins_channel := ins_channel || e.channel;
                ins_quantity := ins_quantity || e.quantity;
                ins_rate := ins_rate || e.rate;
                ins_agent := ins_agent || e.agent_id;
                ins_key := ins_key || e.key;
                ins_hash := ins_hash || e.hash;
                ins_meta := ins_meta || e.metadata;
                IF e.repeated THEN
                    rep_keys := rep_keys || e.key;
                    rep_ords := rep_ords || e.ord;
                END IF;
            END IF;
        END IF;
        res[e.ord] := r;
    END LOOP;
    IF v_total > 0 THEN
        acc_ids := acc_ids || v_account;
        acc_totals := acc_totals || v_total;
        acc_burns := acc_burns || v_burn;
    END IF;

    INSERT INTO journal (id, account_id, type, amount_micros, counter_book, balance_after_micros, description,
                         feature_id, channel, quantity, credits_per_unit, agent_id, idempotency_key,
                         request_hash, metadata)
        SELECT t.id, t.account_id, 'usage', t.amount, 'system:usage_revenue', t.balance, t.description,
               t.feature_id, t.channel, t.quantity, t.rate, t.agent_id, t.key, t.hash, t.metadata
        FROM unnest(ins_id, ins_account, ins_amount, ins_balance, ins_desc, ins_feature, ins_channel,
                    ins_quantity, ins_rate, ins_agent, ins_key, ins_hash, ins_meta)
             AS t (id, account_id, amount, balance, description, feature_id, channel, quantity, rate, agent_id,
                   key, hash, metadata);
    UPDATE balances b SET balance_micros = b.balance_micros - t.total, unburned_micros = b.unburned_micros + t.burn,
                          updated_at = now()
        FROM unnest(acc_ids, acc_totals, acc_burns) AS t (account_id, total, burn)
        WHERE b.account_id = t.account_id;
    RETURN QUERY SELECT (x).* FROM unnest(res) AS x;
END $$;

-- Reserve credits for long-running usage (a call): priced like track, not spendable meanwhile.
CREATE FUNCTION cf_hold(
    p_account text, p_feature text, p_quantity numeric, p_agent text, p_ttl_seconds integer,
    p_key text, p_hash bytea, p_metadata jsonb
) RETURNS cf_hold_result LANGUAGE plpgsql AS $$
DECLARE
    r cf_hold_result;
    b record;
    f cf_price_result;
    h record;
BEGIN
    r.allowed := false;
    r.replayed := false;
    SELECT balance_micros, held_micros, floor_micros INTO b FROM balances WHERE account_id = p_account FOR UPDATE;
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
        SELECT balance_micros, held_micros, floor_micros INTO b FROM balances WHERE account_id = p_account;
    END IF;
    r.balance_micros := b.balance_micros;
    r.held_micros := b.held_micros;
    r.floor_micros := b.floor_micros;
    f := cf_price(p_feature, p_quantity);
    IF f.code <> 'ok' THEN
        r.code := f.code;
        RETURN r;
    END IF;
    r.amount_micros := f.charge_micros;
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

-- Settle a hold with the actual quantity: release the reservation and charge the actual usage
-- through cf_track (key 'hold:<id>'), atomically. Settling twice replays the first settlement.
-- A hold that already expired is still charged (the usage happened), subject to the floor.
CREATE FUNCTION cf_hold_settle(p_account text, p_hold text, p_quantity numeric, p_metadata jsonb)
RETURNS cf_track_result LANGUAGE plpgsql AS $$
DECLARE
    h record;
    r cf_track_result;
    v_key text := 'hold:' || p_hold;
BEGIN
    PERFORM 1 FROM balances WHERE account_id = p_account FOR UPDATE;
    IF NOT FOUND THEN
        r := ROW(false, 'unknown_account', NULL, 0, NULL, NULL, NULL, NULL, NULL, false, p_hold, NULL)::cf_track_result;
        RETURN r;
    END IF;
    -- Overdue holds (this one included) stop reserving first, so nothing below releases twice.
    PERFORM cf_expire_holds(p_account);
    SELECT id, feature_id, agent_id, amount_micros, status INTO h FROM holds WHERE id = p_hold AND account_id = p_account;
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
    r := cf_track(p_account, h.feature_id, p_quantity, h.agent_id, v_key,
                  sha256(convert_to(v_key || ':' || trim_scale(p_quantity)::text, 'UTF8')),
                  coalesce(p_metadata, '{}'::jsonb) || jsonb_build_object('hold_id', p_hold));
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

CREATE FUNCTION cf_hold_release(p_account text, p_hold text) RETURNS cf_hold_result LANGUAGE plpgsql AS $$
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
