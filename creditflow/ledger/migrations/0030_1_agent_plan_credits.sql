-- Plan credits and agents (issue 13, item 4; seed 001 "What happens when credits run out", "Spending limits per
-- agent"). Decided on the hot path, in the metering transaction, for plan accounts with registered agents only
-- (the controlled path); accounts without a plan or without agents do exactly the work they did.
--
-- * ``on_plan_exhausted = 'stop'``: the agent never spends the wallet. An event (or a new hold) that costs more than
--   the plan credits available to it is refused with ``plan_credits_exhausted`` (before: refused only once plan
--   credits were at 0, so the last event spilled into the wallet). Available = plan credits left minus what active
--   holds reserve (holds are charged plan credits first), and at most what its plan-credit limit has left. The
--   refusal writes a ``limit.reached`` outbox row (scope ``plan_credits``, action ``pause``): the account workflow
--   pauses the agent (``paused_by: system``, reason ``plan_credits_exhausted``, ``resume_at`` = the cycle's end) and
--   notifies. A top-up (or auto-recharge) while it is paused resumes it (trigger below -> ``limits.changed``) and lets
--   it continue on the wallet until the cycle renews (``agents.wallet_until``): "until you top up or the cycle renews".
-- * Holds of a stop agent are capped at what is available: a hold asking for more reserves only that (the answer's
--   ``credits_required`` says what the whole quantity would cost); with nothing available it is refused. Settling
--   such a hold charges at most the plan credits then available to the agent; the rest is not charged and is recorded
--   on the usage row (``metadata.uncovered_micros``), so even a call that ran long never reaches the wallet.
-- * ``agents.plan_limit_micros`` (API ``plan_credit_limit``, seed 001's monthly limit per agent): the plan credits the
--   agent may take per billing period (the subscription's period, "monthly" for plan accounts). At the limit a stop
--   agent is refused as above; a use_balance agent goes on from the wallet only (its events pay the overage rate and
--   burn purchased/granted lots, never plan lots; while plan credits remain it cannot draw on the overage credit line,
--   which only starts below zero), and its crossing is notified once (``limit.reached``, scope ``agent_plan_credits``,
--   action ``alert_only``). This is not seed 000's per-agent spending limit (``monthly_limit`` / ``per_agent_limit``,
--   a cap on all the agent's spending per UTC month with pause / alert_only), which is unchanged.

ALTER TABLE agents
    ADD COLUMN plan_limit_micros  bigint CHECK (plan_limit_micros > 0),
    ADD COLUMN plan_period_start  timestamptz,
    ADD COLUMN plan_spent_micros  bigint NOT NULL DEFAULT 0 CHECK (plan_spent_micros >= 0),
    ADD COLUMN wallet_until       timestamptz;

-- What an agent may take from plan credits now. ``stop``: it must not spend the wallet (a stop agent not allowed the
-- wallet by a top-up); ``room``: what its plan-credit limit has left this period (NULL: no limit).
CREATE TYPE cf_agent_plan_state AS (
    stop          boolean,
    room          bigint,
    period_start  timestamptz,
    spent         bigint,
    plan_limit    bigint
);

CREATE FUNCTION cf_agent_plan(p_account text, p_agent text) RETURNS cf_agent_plan_state LANGUAGE plpgsql STABLE AS $$
DECLARE
    s cf_agent_plan_state;
    a record;
BEGIN
    s.stop := false;
    s.spent := 0;
    IF p_agent IS NULL THEN
        RETURN s;
    END IF;
    SELECT on_plan_exhausted, plan_limit_micros, plan_period_start, plan_spent_micros, wallet_until INTO a
        FROM agents WHERE account_id = p_account AND id = p_agent;
    IF NOT FOUND THEN
        RETURN s;
    END IF;
    SELECT period_start INTO s.period_start FROM subscriptions WHERE account_id = p_account AND status = 'active';
    s.stop := a.on_plan_exhausted = 'stop' AND NOT coalesce(a.wallet_until > cf_now(), false);
    s.spent := CASE WHEN a.plan_period_start = s.period_start THEN a.plan_spent_micros ELSE 0 END;
    s.plan_limit := a.plan_limit_micros;
    s.room := CASE WHEN a.plan_limit_micros IS NULL THEN NULL ELSE greatest(0, a.plan_limit_micros - s.spent) END;
    RETURN s;
END $$;

-- A stop agent refused for want of plan credits: one outbox row per refusal streak (the key carries the agent's last
-- pause/resume event, so after a resume a new exhaustion pauses it again).
CREATE FUNCTION cf_emit_plan_stop(p_account text, p_agent text, s cf_agent_plan_state, p_avail bigint,
                                  p_charge bigint) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_period text := coalesce(s.period_start::date::text, cf_utc_today()::text);
    v_seq bigint;
BEGIN
    SELECT coalesce(max(id), 0) INTO v_seq FROM agent_events WHERE account_id = p_account AND agent_id = p_agent;
    INSERT INTO outbox (account_id, kind, dedup_key, payload)
    VALUES (p_account, 'limit.reached',
            'limit.reached:' || p_account || ':plan_credits:' || p_agent || ':' || v_period || ':' || v_seq,
            jsonb_strip_nulls(jsonb_build_object(
                'scope', 'plan_credits', 'agent_id', p_agent, 'period', v_period, 'action', 'pause',
                'available_micros', p_avail, 'required_micros', p_charge,
                'limit_micros', s.plan_limit, 'spent_micros', s.spent)))
    ON CONFLICT (dedup_key) DO NOTHING;
END $$;

-- Burn ``p_amount`` from the account's lots other than plan lots, in burn order (cf_burn without plan lots). The
-- caller settled pending burns first and checked that these lots cover the amount.
CREATE FUNCTION cf_burn_wallet(p_account text, p_amount bigint) RETURNS void LANGUAGE plpgsql AS $$
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

-- As in 0018, with the stop rule above (an event costing more than the plan credits available to a stop agent).
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
    v_held bigint;
    v_avail bigint;
    s cf_agent_plan_state;
BEGIN
    SELECT daily_limit_micros, monthly_limit_micros, per_agent_limit_micros, limit_action, day_start,
           day_spent_micros, month_start, month_spent_micros, agent_controls, plan_id, plan_left_micros, held_micros
        INTO b FROM balances WHERE account_id = p_account;
    IF p_agent IS NOT NULL AND (b.agent_controls OR b.per_agent_limit_micros IS NOT NULL) THEN
        SELECT a.status, coalesce(a.monthly_limit_micros, b.per_agent_limit_micros),
               coalesce(a.limit_action, b.limit_action),
               CASE WHEN a.month_start = v_month THEN a.month_spent_micros ELSE 0 END
            INTO v_status, v_limit, v_action, v_spent
            FROM agents a WHERE a.account_id = p_account AND a.id = p_agent;
        IF NOT FOUND THEN  -- not registered yet: the account's per-agent limit applies, nothing spent
            v_status := 'active';
            v_limit := b.per_agent_limit_micros;
            v_action := b.limit_action;
            v_spent := 0;
        END IF;
        IF v_status = 'paused' THEN
            RETURN 'agent_paused';
        END IF;
        IF b.plan_id IS NOT NULL THEN
            s := cf_agent_plan(p_account, p_agent);
            IF s.stop THEN
                v_avail := greatest(0, b.plan_left_micros - b.held_micros);
                IF s.room IS NOT NULL THEN
                    v_avail := least(v_avail, s.room);
                END IF;
                IF p_charge > v_avail THEN
                    IF p_emit THEN
                        PERFORM cf_emit_plan_stop(p_account, p_agent, s, v_avail, p_charge);
                    END IF;
                    RETURN 'plan_credits_exhausted';
                END IF;
            END IF;
        END IF;
        IF v_limit IS NOT NULL AND v_action = 'pause' THEN
            SELECT coalesce(sum(amount_micros), 0) INTO v_held FROM holds
                WHERE account_id = p_account AND agent_id = p_agent AND status = 'active' AND expires_at > now();
        END IF;
        IF v_limit IS NOT NULL AND v_action = 'pause' AND v_spent + v_held + p_charge > v_limit THEN
            IF p_emit THEN
                PERFORM cf_emit_spend_event(p_account, 'limit.reached', 'agent_monthly', p_agent, v_month::text,
                                            v_limit, v_spent, v_action);
            END IF;
            RETURN 'agent_limit_reached';
        END IF;
    END IF;
    -- Credits reserved by active holds count as spent: a call in progress cannot be refused at its end.
    v_spent := CASE WHEN b.day_start = v_today THEN b.day_spent_micros ELSE 0 END + b.held_micros;
    IF b.daily_limit_micros IS NOT NULL AND b.limit_action = 'pause' AND v_spent + p_charge > b.daily_limit_micros THEN
        IF p_emit THEN
            PERFORM cf_emit_spend_event(p_account, 'limit.reached', 'daily', NULL, v_today::text,
                                        b.daily_limit_micros, v_spent, b.limit_action);
        END IF;
        RETURN 'daily_limit_reached';
    END IF;
    v_spent := CASE WHEN b.month_start = v_month THEN b.month_spent_micros ELSE 0 END + b.held_micros;
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

-- cf_track as in 0013; on the controlled path of a plan account, a registered agent's plan terms (above): the plan rate
-- only while plan credits are left to it, a stop agent's hold settlement capped at what is left to it, a use_balance
-- agent past its plan-credit limit charged to the wallet's lots only, and its plan credits counted per period.
-- The fast UPDATE is byte-for-byte the same.
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
    s cf_agent_plan_state;
    v_agent_plan boolean := false;
    v_cap bigint;
    v_plan_take bigint;
    v_wallet bigint := 0;
    v_uncovered bigint := 0;
    v_before bigint;
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
        SELECT balance_micros, held_micros, floor_micros, controlled, plan_id, plan_left_micros, agent_controls INTO b
            FROM balances WHERE account_id = p_account FOR UPDATE;
        IF NOT FOUND THEN
            r.code := 'unknown_account';
            r.charged_micros := 0;
            RETURN r;
        END IF;
        IF b.held_micros > 0 AND cf_expire_holds(p_account) > 0 THEN
            SELECT balance_micros, held_micros, floor_micros, controlled, plan_id, plan_left_micros, agent_controls
                INTO b FROM balances WHERE account_id = p_account;
        END IF;
        IF b.plan_id IS NOT NULL AND p_agent IS NOT NULL AND b.agent_controls THEN
            s := cf_agent_plan(p_account, p_agent);
            v_agent_plan := s.period_start IS NOT NULL;
        END IF;
        IF b.plan_id IS NOT NULL THEN
            f := cf_plan_price(f, b.plan_id, p_feature, p_quantity,
                               b.plan_left_micros > 0 AND coalesce(s.room, 1) > 0);
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
        -- What plan credits this event takes (plan lots burn first), and for a registered agent its terms.
        v_plan_take := least(r.charged_micros, b.plan_left_micros, greatest(b.balance_micros, 0));
        IF v_agent_plan AND s.stop AND p_key LIKE 'hold:%' THEN
            -- A stop agent's hold settlement: never more than the plan credits left to it (the rest is not charged).
            v_cap := least(b.plan_left_micros, coalesce(s.room, b.plan_left_micros));
            IF r.charged_micros > v_cap THEN
                v_uncovered := r.charged_micros - v_cap;
                r.charged_micros := v_cap;
                v_plan_take := v_cap;
            END IF;
        ELSIF v_agent_plan AND NOT s.stop AND s.room IS NOT NULL AND s.room < v_plan_take THEN
            -- A use_balance agent at its plan-credit limit: the rest from the wallet's lots only.
            v_plan_take := s.room;
            v_wallet := r.charged_micros - v_plan_take;
            IF v_wallet > b.balance_micros - b.plan_left_micros THEN
                r.code := 'insufficient_credits';
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
        IF v_wallet > 0 THEN
            PERFORM cf_settle_burns(p_account);
            PERFORM cf_burn_wallet(p_account, v_wallet);
            UPDATE balances SET balance_micros = balance_micros - r.charged_micros,
                                unburned_micros = unburned_micros + v_plan_take,
                                plan_left_micros = plan_left_micros - v_plan_take,
                                updated_at = now()
                WHERE account_id = p_account
                RETURNING balance_micros, held_micros, floor_micros INTO r.balance_micros, r.held_micros, r.floor_micros;
        ELSE
            -- What the lots owe burns plan lots first: plan_left shrinks by the same amount (never below 0).
            UPDATE balances SET balance_micros = balance_micros - r.charged_micros,
                                unburned_micros = unburned_micros + least(r.charged_micros, greatest(balance_micros, 0)),
                                plan_left_micros = greatest(0, plan_left_micros
                                                               - least(r.charged_micros, greatest(balance_micros, 0))),
                                updated_at = now()
                WHERE account_id = p_account
                RETURNING balance_micros, held_micros, floor_micros INTO r.balance_micros, r.held_micros, r.floor_micros;
        END IF;
        IF b.controlled THEN
            PERFORM cf_spend_record(p_account, p_agent, r.charged_micros);
        END IF;
        IF v_agent_plan AND v_plan_take > 0 THEN
            UPDATE agents SET plan_spent_micros = CASE WHEN plan_period_start = s.period_start THEN plan_spent_micros
                                                       ELSE 0 END + v_plan_take,
                              plan_period_start = s.period_start
                WHERE account_id = p_account AND id = p_agent;
            IF NOT s.stop AND s.plan_limit IS NOT NULL AND s.spent < s.plan_limit
                    AND s.spent + v_plan_take >= s.plan_limit THEN
                PERFORM cf_emit_spend_event(p_account, 'limit.reached', 'agent_plan_credits', p_agent,
                                            s.period_start::date::text, s.plan_limit, s.spent + v_plan_take,
                                            'alert_only');
            END IF;
        END IF;
    END IF;

    INSERT INTO journal (account_id, type, amount_micros, counter_book, balance_after_micros, description,
                         feature_id, channel, quantity, credits_per_unit, agent_id, idempotency_key,
                         request_hash, metadata)
        VALUES (p_account, 'usage', -r.charged_micros, 'system:usage_revenue', r.balance_micros,
                f.name || coalesce(': ' || p_agent, ''), p_feature, f.channel, p_quantity, f.credits_per_unit,
                p_agent, p_key, p_hash,
                CASE WHEN v_uncovered > 0 THEN coalesce(p_metadata, '{}'::jsonb)
                                               || jsonb_build_object('uncovered_micros', v_uncovered)
                     ELSE p_metadata END)
        RETURNING id INTO r.txn_id;
    r.allowed := true;
    r.code := 'ok';
    RETURN r;
END $$;

-- cf_hold_unchecked (0013) with a cap on the reservation (a stop agent's holds) and the plan-rate decision given by
-- the caller (NULL: plan credits left); a capped hold answers the whole price in ``required_micros``.
CREATE FUNCTION cf_hold_reserve(
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

-- A top-up or an auto-recharge while a stop agent is paused for want of plan credits: tell the account workflow
-- (``limits.changed``), which resumes it on the wallet until the cycle renews. Usage rows never fire this.
CREATE FUNCTION cf_purchase_resumes_agents() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM agents WHERE account_id = NEW.account_id AND status = 'paused'
               AND pause_reason = 'plan_credits_exhausted') THEN
        INSERT INTO outbox (account_id, kind, dedup_key)
        VALUES (NEW.account_id, 'limits.changed', 'limits.changed:' || NEW.account_id || ':purchase:' || NEW.id)
        ON CONFLICT (dedup_key) DO NOTHING;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER journal_purchase_resumes_agents AFTER INSERT ON journal FOR EACH ROW
    WHEN (NEW.type IN ('purchase', 'auto_recharge') AND NEW.amount_micros > 0)
    EXECUTE FUNCTION cf_purchase_resumes_agents();
