-- spend_control: today's definitions (creditflow/ledger/functions_check.py and docs/development.md, "Database functions"). Edit here; no migration.
-- Registering an agent puts its account on the controlled path (so pauses and agent limits are seen).
CREATE OR REPLACE FUNCTION cf_agent_controls() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE balances SET agent_controls = true WHERE account_id = NEW.account_id AND NOT agent_controls;
    RETURN NULL;
END $$;

-- A limit reached (or an alert threshold crossed): one outbox row per scope and period (the dedup key
-- says which), however many events hit it.
CREATE OR REPLACE FUNCTION cf_emit_spend_event(p_account text, p_kind text, p_scope text, p_agent text, p_period text,
                                    p_limit bigint, p_spent bigint, p_action text) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO outbox (account_id, kind, dedup_key, payload)
    VALUES (p_account, p_kind,
            p_kind || ':' || p_account || ':' || p_scope || coalesce(':' || p_agent, '') || ':' || p_period,
            jsonb_strip_nulls(jsonb_build_object('scope', p_scope, 'agent_id', p_agent, 'period', p_period,
                                                 'limit_micros', p_limit, 'spent_micros', p_spent,
                                                 'action', p_action)))
    ON CONFLICT (dedup_key) DO NOTHING;
$$;

-- Count an allowed charge against the day, the month and the agent, and emit what it crossed: a limit
-- reached (``limit.reached``, any action) and the daily usage alert (``usage.daily_threshold``).
-- The caller holds the balances row lock.
CREATE OR REPLACE FUNCTION cf_spend_record(p_account text, p_agent text, p_charge bigint) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    b record;
    v_today date := cf_utc_today();
    v_month date := date_trunc('month', cf_utc_today())::date;
    v_day_before bigint;
    v_month_before bigint;
    v_agent_before bigint;
    v_limit bigint;
    v_action text;
BEGIN
    UPDATE balances AS x SET
            day_spent_micros = CASE WHEN x.day_start = v_today THEN x.day_spent_micros ELSE 0 END + p_charge,
            day_start = v_today,
            month_spent_micros = CASE WHEN x.month_start = v_month THEN x.month_spent_micros ELSE 0 END + p_charge,
            month_start = v_month
        FROM balances o WHERE x.account_id = p_account AND o.account_id = p_account
        RETURNING CASE WHEN o.day_start = v_today THEN o.day_spent_micros ELSE 0 END AS day_before,
                  CASE WHEN o.month_start = v_month THEN o.month_spent_micros ELSE 0 END AS month_before,
                  x.daily_limit_micros, x.monthly_limit_micros, x.per_agent_limit_micros, x.limit_action,
                  x.daily_usage_alert_micros, x.agent_controls
        INTO b;
    v_day_before := b.day_before;
    v_month_before := b.month_before;
    IF b.daily_limit_micros IS NOT NULL AND v_day_before < b.daily_limit_micros
            AND v_day_before + p_charge >= b.daily_limit_micros THEN
        PERFORM cf_emit_spend_event(p_account, 'limit.reached', 'daily', NULL, v_today::text, b.daily_limit_micros,
                                    v_day_before + p_charge, b.limit_action);
    END IF;
    IF b.monthly_limit_micros IS NOT NULL AND v_month_before < b.monthly_limit_micros
            AND v_month_before + p_charge >= b.monthly_limit_micros THEN
        PERFORM cf_emit_spend_event(p_account, 'limit.reached', 'monthly', NULL, v_month::text,
                                    b.monthly_limit_micros, v_month_before + p_charge, b.limit_action);
    END IF;
    IF b.daily_usage_alert_micros IS NOT NULL AND v_day_before < b.daily_usage_alert_micros
            AND v_day_before + p_charge >= b.daily_usage_alert_micros THEN
        PERFORM cf_emit_spend_event(p_account, 'usage.daily_threshold', 'daily', NULL, v_today::text,
                                    b.daily_usage_alert_micros, v_day_before + p_charge, NULL);
    END IF;
    IF p_agent IS NOT NULL AND (b.agent_controls OR b.per_agent_limit_micros IS NOT NULL) THEN
        -- An agent seen for the first time under controls is registered (its spend must be counted).
        INSERT INTO agents AS a (account_id, id, month_start, month_spent_micros)
            VALUES (p_account, p_agent, v_month, p_charge)
            ON CONFLICT (account_id, id) DO UPDATE SET
                month_spent_micros = CASE WHEN a.month_start = v_month THEN a.month_spent_micros ELSE 0 END + p_charge,
                month_start = v_month
            RETURNING month_spent_micros - p_charge, coalesce(a.monthly_limit_micros, b.per_agent_limit_micros),
                      coalesce(a.limit_action, b.limit_action)
            INTO v_agent_before, v_limit, v_action;
        IF v_limit IS NOT NULL AND v_agent_before < v_limit AND v_agent_before + p_charge >= v_limit THEN
            PERFORM cf_emit_spend_event(p_account, 'limit.reached', 'agent_monthly', p_agent, v_month::text,
                                        v_limit, v_agent_before + p_charge, v_action);
        END IF;
    END IF;
END $$;

-- Recompute an account's counters from the journal (usage rows of the current UTC day and month, per
-- agent too), under the balances lock: called whenever limits or agents are saved.
CREATE OR REPLACE FUNCTION cf_refresh_spend(p_account text) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_today date := cf_utc_today();
    v_month date := date_trunc('month', cf_utc_today())::date;
BEGIN
    PERFORM 1 FROM balances WHERE account_id = p_account FOR UPDATE;
    UPDATE balances SET
        day_start = v_today,
        day_spent_micros = coalesce((SELECT -sum(amount_micros) FROM journal WHERE account_id = p_account
            AND type = 'usage' AND created_at >= v_today::timestamp AT TIME ZONE 'UTC'), 0),
        month_start = v_month,
        month_spent_micros = coalesce((SELECT -sum(amount_micros) FROM journal WHERE account_id = p_account
            AND type = 'usage' AND created_at >= v_month::timestamp AT TIME ZONE 'UTC'), 0)
        WHERE account_id = p_account;
    UPDATE agents a SET month_start = v_month,
        month_spent_micros = coalesce((SELECT -sum(amount_micros) FROM journal j WHERE j.account_id = p_account
            AND j.type = 'usage' AND j.agent_id = a.id
            AND j.created_at >= v_month::timestamp AT TIME ZONE 'UTC'), 0)
        WHERE a.account_id = p_account;
END $$;

-- The same rule as the generated column it replaces (0013).
CREATE OR REPLACE FUNCTION cf_balances_controlled() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.controlled := NEW.daily_limit_micros IS NOT NULL OR NEW.monthly_limit_micros IS NOT NULL
        OR NEW.per_agent_limit_micros IS NOT NULL OR NEW.daily_usage_alert_micros IS NOT NULL OR NEW.agent_controls
        OR NEW.plan_id IS NOT NULL OR NEW.plan_left_micros > 0;
    RETURN NEW;
END $$;

CREATE OR REPLACE FUNCTION cf_agent_plan(p_account text, p_agent text) RETURNS cf_agent_plan_state LANGUAGE plpgsql STABLE AS $$
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
CREATE OR REPLACE FUNCTION cf_emit_plan_stop(p_account text, p_agent text, s cf_agent_plan_state, p_avail bigint,
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

-- A top-up or an auto-recharge while a stop agent is paused for want of plan credits: tell the account workflow
-- (``limits.changed``), which resumes it on the wallet until the cycle renews. Called by cf_post for a positive
-- ``purchase`` / ``auto_recharge`` entry (the only writer of those), in its transaction. It was an AFTER INSERT
-- trigger on the journal until 0042: its WHEN clause was parsed again for every journal row, usage rows included
-- (about 3.5 % of the server's CPU per tracked event).
CREATE OR REPLACE FUNCTION cf_purchase_resumes_agents(p_account text, p_txn uuid) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM agents WHERE account_id = p_account AND status = 'paused'
               AND pause_reason = 'plan_credits_exhausted') THEN
        INSERT INTO outbox (account_id, kind, dedup_key)
        VALUES (p_account, 'limits.changed', 'limits.changed:' || p_account || ':purchase:' || p_txn)
        ON CONFLICT (dedup_key) DO NOTHING;
    END IF;
END $$;
