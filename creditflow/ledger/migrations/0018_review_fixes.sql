-- Fixes from review (issue 4/5):
-- 1. Plan credit expiry is bounded by the closed period's end: a renewal retried after it granted the next
--    period's credits (worker crash, timeout) expired those too, because "nothing left to expire" wrote no
--    journal row under the expiry key. Plan lots carry expires_at = their period's end, so lots of a later period
--    are never touched now.
-- 2. Limits count credits reserved by active holds: several holds (or a hold and events) could each pass the gate
--    and together exceed a hard limit, since settling a hold is never refused.

CREATE FUNCTION cf_expire_plan_credits(p_account text, p_key text, p_description text, p_max bigint,
                                       p_until timestamptz) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_left bigint;
    v_done bigint;
    b record;
    r cf_post_result;
BEGIN
    PERFORM 1 FROM balances WHERE account_id = p_account FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown_account' USING ERRCODE = 'CF404';
    END IF;
    SELECT -amount_micros INTO v_done FROM journal WHERE account_id = p_account AND idempotency_key = p_key;
    IF FOUND THEN
        RETURN v_done;
    END IF;
    PERFORM cf_settle_account_burns(p_account);
    IF (SELECT held_micros FROM balances WHERE account_id = p_account) > 0 THEN
        PERFORM cf_expire_holds(p_account);
    END IF;
    SELECT balance_micros, held_micros, floor_micros INTO b FROM balances WHERE account_id = p_account;
    -- Plan lots burn in expiry order, so burning this amount takes it from exactly these (earliest) lots.
    SELECT least(coalesce(sum(remaining_micros), 0), p_max, greatest(b.balance_micros - b.held_micros - b.floor_micros, 0))
        INTO v_left FROM credit_lots WHERE account_id = p_account AND source = 'plan' AND NOT depleted
        AND (p_until IS NULL OR expires_at IS NULL OR expires_at <= p_until);
    IF v_left <= 0 THEN
        RETURN 0;
    END IF;
    r := cf_post(p_account, 'plan_expiry', -v_left, 'system:breakage', p_description, NULL, 'plan', 0, NULL, p_key,
                 NULL);
    RETURN v_left;
END $$;

CREATE OR REPLACE FUNCTION cf_expire_plan_credits(p_account text, p_key text, p_description text, p_max bigint)
RETURNS bigint LANGUAGE sql AS $$ SELECT cf_expire_plan_credits(p_account, p_key, p_description, p_max, NULL) $$;

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
    v_held bigint;
BEGIN
    SELECT daily_limit_micros, monthly_limit_micros, per_agent_limit_micros, limit_action, day_start,
           day_spent_micros, month_start, month_spent_micros, agent_controls, plan_id, plan_left_micros, held_micros
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
