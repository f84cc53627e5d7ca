-- Plan pricing on the hot path (issue 4): plan rates, overage rates and ``on_plan_exhausted`` = 'stop',
-- decided inside the metering transaction.
--
-- * plan_rates: every feature's resolved rate per plan, written from the catalog by
--   creditflow.ledger.plan_pricing.sync_plan_rates (the Python resolution of creditflow.domain.plans: plan rate or
--   card rate while plan credits last; overage rate, else plan rate, else card rate once they are spent;
--   toll-free = the plan's voice rate + the card's surcharge). The SQL side does a plain lookup; a plan or
--   feature without a row (not synced yet) falls back to the rate card.
-- * balances.plan_id: the plan of the account's active subscription (set/cleared by save_subscription in the
--   transaction that saves the subscription row).
-- * balances.plan_left_micros: max(0, sum(remaining of plan lots) - unburned), kept by every writer under the
--   account lock so the hot path knows "plan credits left?" without reading lots. Usage and negative postings burn
--   plan lots first (priority 0), so they take min(burn, plan_left) from it; a plan grant adds what its lot keeps.
-- * ``controlled`` now also covers accounts with a plan or plan credits left: they take the full path (cf_track's
--   fast UPDATE is unchanged, so wallet-only accounts without controls pay nothing for this). Because an
--   uncontrolled account always has plan_left = 0 and its usage keeps it 0, the fast paths need not touch it.
--
-- Pricing rule: an event is priced at the rate in force when it starts. While plan_left > 0 that is the plan
-- rate, even for an event that costs more than what is left (the part above plan_left is paid from the wallet at
-- the plan rate); the next event pays the overage rate. Holds reserve at the plan/overage rate in force when the
-- hold is taken; the settlement is priced like any event, at the rate in force when it is settled.
-- ``plan_credits_exhausted``: an agent registered with on_plan_exhausted = 'stop' is refused (usage, holds and
-- checks) while the account has an active plan and plan_left = 0. Usage without an agent, unregistered agents
-- and 'use_balance' agents continue on the wallet. Hold settlements are never refused (the usage happened).

CREATE TABLE plan_rates (
    plan_id                   text NOT NULL,
    feature_id                text NOT NULL REFERENCES features (id),
    credits_per_unit          numeric(20, 6) NOT NULL CHECK (credits_per_unit >= 0),
    overage_credits_per_unit  numeric(20, 6) NOT NULL CHECK (overage_credits_per_unit >= 0),
    updated_at                timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (plan_id, feature_id)
);

ALTER TABLE balances
    ADD COLUMN plan_id           text,
    ADD COLUMN plan_left_micros  bigint NOT NULL DEFAULT 0 CHECK (plan_left_micros >= 0);

-- Re-create the generated column with the plan terms (functions read it by name at run time: no dependency).
ALTER TABLE balances DROP COLUMN controlled;
ALTER TABLE balances ADD COLUMN controlled boolean GENERATED ALWAYS AS (
    daily_limit_micros IS NOT NULL OR monthly_limit_micros IS NOT NULL OR per_agent_limit_micros IS NOT NULL
    OR daily_usage_alert_micros IS NOT NULL OR agent_controls OR plan_id IS NOT NULL OR plan_left_micros > 0) STORED;

-- Existing accounts: their active plan and the plan credits they have left.
UPDATE balances b SET plan_id = s.plan_id FROM subscriptions s WHERE s.account_id = b.account_id AND s.status = 'active';
UPDATE balances b SET plan_left_micros = greatest(0, l.s - b.unburned_micros)
    FROM (SELECT account_id, sum(remaining_micros) AS s FROM credit_lots WHERE source = 'plan' AND NOT depleted
          GROUP BY account_id) l
    WHERE l.account_id = b.account_id;

-- The card price ``p_price`` (from cf_price) re-priced with the plan's rate: the plan rate while plan credits
-- last (``p_in_plan``), the overage rate once they are spent. No plan, a refused card price, or no plan_rates row:
-- the card price as it is.
CREATE FUNCTION cf_plan_price(p_price cf_price_result, p_plan text, p_feature text, p_quantity numeric,
                              p_in_plan boolean) RETURNS cf_price_result LANGUAGE plpgsql STABLE AS $$
DECLARE
    r cf_price_result := p_price;
    v_rate numeric;
BEGIN
    IF p_plan IS NULL OR r.code IS DISTINCT FROM 'ok' THEN
        RETURN r;
    END IF;
    SELECT CASE WHEN p_in_plan THEN credits_per_unit ELSE overage_credits_per_unit END INTO v_rate
        FROM plan_rates WHERE plan_id = p_plan AND feature_id = p_feature;
    IF NOT FOUND THEN
        RETURN r;
    END IF;
    r.credits_per_unit := v_rate;
    IF round(p_quantity * v_rate * 1000000) > 1000000000000000 THEN
        r.code := 'amount_too_large';
        r.charge_micros := NULL;
    ELSE
        r.charge_micros := cf_charge_micros(p_quantity, v_rate);
    END IF;
    RETURN r;
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

-- May this event go ahead under the account's controls? As in 0009, plus ``plan_credits_exhausted``: a registered
-- agent set to 'stop' while the account's active plan has no credits left. A paused agent is reported first.
CREATE OR REPLACE FUNCTION cf_spend_gate(p_account text, p_agent text, p_charge bigint, p_emit boolean DEFAULT true)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    b record;
    v_today date := cf_utc_today();
    v_month date := date_trunc('month', cf_utc_today())::date;
    v_status text;
    v_limit bigint;
    v_action text;
    v_spent bigint;
    v_on_exhausted text;
BEGIN
    SELECT daily_limit_micros, monthly_limit_micros, per_agent_limit_micros, limit_action, day_start,
           day_spent_micros, month_start, month_spent_micros, agent_controls, plan_id, plan_left_micros
        INTO b FROM balances WHERE account_id = p_account;
    IF p_agent IS NOT NULL AND (b.agent_controls OR b.per_agent_limit_micros IS NOT NULL) THEN
        SELECT a.status, coalesce(a.monthly_limit_micros, b.per_agent_limit_micros),
               coalesce(a.limit_action, b.limit_action),
               CASE WHEN a.month_start = v_month THEN a.month_spent_micros ELSE 0 END, a.on_plan_exhausted
            INTO v_status, v_limit, v_action, v_spent, v_on_exhausted
            FROM agents a WHERE a.account_id = p_account AND a.id = p_agent;
        IF NOT FOUND THEN  -- not registered yet: the account's per-agent limit applies, nothing spent
            v_status := 'active';
            v_limit := b.per_agent_limit_micros;
            v_action := b.limit_action;
            v_spent := 0;
            v_on_exhausted := 'use_balance';
        END IF;
        IF v_status = 'paused' THEN
            RETURN 'agent_paused';
        END IF;
        IF v_on_exhausted = 'stop' AND b.plan_id IS NOT NULL AND b.plan_left_micros = 0 THEN
            RETURN 'plan_credits_exhausted';
        END IF;
        IF v_limit IS NOT NULL AND v_action = 'pause' AND v_spent + p_charge > v_limit THEN
            IF p_emit THEN
                PERFORM cf_emit_spend_event(p_account, 'limit.reached', 'agent_monthly', p_agent, v_month::text,
                                            v_limit, v_spent, v_action);
            END IF;
            RETURN 'agent_limit_reached';
        END IF;
    END IF;
    v_spent := CASE WHEN b.day_start = v_today THEN b.day_spent_micros ELSE 0 END;
    IF b.daily_limit_micros IS NOT NULL AND b.limit_action = 'pause' AND v_spent + p_charge > b.daily_limit_micros THEN
        IF p_emit THEN
            PERFORM cf_emit_spend_event(p_account, 'limit.reached', 'daily', NULL, v_today::text,
                                        b.daily_limit_micros, v_spent, b.limit_action);
        END IF;
        RETURN 'daily_limit_reached';
    END IF;
    v_spent := CASE WHEN b.month_start = v_month THEN b.month_spent_micros ELSE 0 END;
    IF b.monthly_limit_micros IS NOT NULL AND b.limit_action = 'pause'
            AND v_spent + p_charge > b.monthly_limit_micros THEN
        IF p_emit THEN
            PERFORM cf_emit_spend_event(p_account, 'limit.reached', 'monthly', NULL, v_month::text,
                                        b.monthly_limit_micros, v_spent, b.limit_action);
        END IF;
        RETURN 'monthly_limit_reached';
    END IF;
    RETURN 'ok';
END $$;

-- cf_track as in 0009; the controlled path now also prices with the account's plan (plan rate while plan_left > 0,
-- overage rate once it is 0, judged at the event's start) and burns plan credits first (plan_left_micros).
-- The fast UPDATE is byte-for-byte the same: accounts without a plan or controls do exactly the work they did.
CREATE OR REPLACE FUNCTION cf_track(
    p_account text, p_feature text, p_quantity numeric, p_agent text, p_key text,
    p_hash bytea, p_metadata jsonb, p_probe boolean DEFAULT true
) RETURNS cf_track_result LANGUAGE plpgsql AS $$
DECLARE
    r cf_track_result;
    f cf_price_result;
    j record;
    b record;
    v_gate text;
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
          AND NOT controlled
        RETURNING balance_micros, held_micros, floor_micros INTO r.balance_micros, r.held_micros, r.floor_micros;
    IF NOT FOUND THEN
        -- Unknown account, overdue holds still reserving, not enough credits, or a controlled account.
        SELECT balance_micros, held_micros, floor_micros, controlled, plan_id, plan_left_micros INTO b
            FROM balances WHERE account_id = p_account FOR UPDATE;
        IF NOT FOUND THEN
            r.code := 'unknown_account';
            r.charged_micros := 0;
            RETURN r;
        END IF;
        IF b.held_micros > 0 AND cf_expire_holds(p_account) > 0 THEN
            SELECT balance_micros, held_micros, floor_micros, controlled, plan_id, plan_left_micros INTO b
                FROM balances WHERE account_id = p_account;
        END IF;
        IF b.plan_id IS NOT NULL THEN
            f := cf_plan_price(f, b.plan_id, p_feature, p_quantity, b.plan_left_micros > 0);
            r.credits_per_unit := f.credits_per_unit;
            IF f.code <> 'ok' THEN
                r.code := f.code;
                r.charged_micros := 0;
                RETURN r;
            END IF;
            r.charged_micros := f.charge_micros;
        END IF;
        IF b.controlled AND p_key NOT LIKE 'hold:%' THEN
            v_gate := cf_spend_gate(p_account, p_agent, r.charged_micros);
            IF v_gate <> 'ok' THEN
                r.code := v_gate;
                r.required_micros := r.charged_micros;
                r.charged_micros := 0;
                r.balance_micros := b.balance_micros;
                r.held_micros := b.held_micros;
                r.floor_micros := b.floor_micros;
                RETURN r;
            END IF;
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
        -- What the lots owe burns plan lots first: plan_left shrinks by the same amount (never below 0).
        UPDATE balances SET balance_micros = balance_micros - r.charged_micros,
                            unburned_micros = unburned_micros + least(r.charged_micros, greatest(balance_micros, 0)),
                            plan_left_micros = greatest(0, plan_left_micros
                                                           - least(r.charged_micros, greatest(balance_micros, 0))),
                            updated_at = now()
            WHERE account_id = p_account
            RETURNING balance_micros, held_micros, floor_micros INTO r.balance_micros, r.held_micros, r.floor_micros;
        IF b.controlled THEN
            PERFORM cf_spend_record(p_account, p_agent, r.charged_micros);
        END IF;
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

-- Batches as in 0009, but ``controlled`` is read from the rows as they are locked (in id order, all of them: the
-- aggregate reads every row; FOR UPDATE hands back the latest version of a row it waited for). Read before the
-- lock, a plan grant (or limits) committed in between could send a now-controlled account down the set-based
-- path, which neither prices with the plan nor keeps plan_left_micros. The set-based path's own lock then finds
-- the rows already held by this transaction.
CREATE OR REPLACE FUNCTION cf_track_batch(
    p_accounts text[], p_features text[], p_quantities numeric[], p_agents text[], p_keys text[],
    p_hashes bytea[], p_metadata jsonb[]
) RETURNS SETOF cf_track_result LANGUAGE plpgsql AS $$
DECLARE
    v_controlled boolean;
BEGIN
    SELECT bool_or(controlled) INTO v_controlled
        FROM (SELECT controlled FROM balances WHERE account_id = ANY (p_accounts) ORDER BY account_id FOR UPDATE) b;
    IF NOT coalesce(v_controlled, false) THEN
        RETURN QUERY SELECT * FROM cf_track_batch_fast(p_accounts, p_features, p_quantities, p_agents, p_keys,
                                                       p_hashes, p_metadata);
        RETURN;
    END IF;
    FOR i IN 1 .. coalesce(cardinality(p_accounts), 0) LOOP
        RETURN NEXT cf_track(p_accounts[i], p_features[i], p_quantities[i], p_agents[i], p_keys[i], p_hashes[i],
                             p_metadata[i], true);
    END LOOP;
END $$;

-- Holds on a plan account reserve at the plan (or overage) rate in force now, the rate the usage would be charged
-- at if it happened now; the gate (0009) sees that amount too. Else as in 0002 / 0009.
CREATE OR REPLACE FUNCTION cf_hold_unchecked(
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
    f := cf_plan_price(cf_price(p_feature, p_quantity), b.plan_id, p_feature, p_quantity, b.plan_left_micros > 0);
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

CREATE OR REPLACE FUNCTION cf_hold(
    p_account text, p_feature text, p_quantity numeric, p_agent text, p_ttl_seconds integer,
    p_key text, p_hash bytea, p_metadata jsonb
) RETURNS cf_hold_result LANGUAGE plpgsql AS $$
DECLARE
    r cf_hold_result;
    b record;
    f cf_price_result;
    v_gate text;
BEGIN
    SELECT balance_micros, held_micros, floor_micros, controlled, plan_id, plan_left_micros INTO b
        FROM balances WHERE account_id = p_account FOR UPDATE;
    IF FOUND AND b.controlled
            AND NOT EXISTS (SELECT 1 FROM holds WHERE account_id = p_account AND idempotency_key = p_key) THEN
        f := cf_plan_price(cf_price(p_feature, p_quantity), b.plan_id, p_feature, p_quantity, b.plan_left_micros > 0);
        IF f.code = 'ok' THEN
            v_gate := cf_spend_gate(p_account, p_agent, f.charge_micros);
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
    RETURN cf_hold_unchecked(p_account, p_feature, p_quantity, p_agent, p_ttl_seconds, p_key, p_hash, p_metadata);
END $$;
