-- Spend control (issue 5): agents, limits and their counters, enforced inside the metering transaction.
--
-- Accounts without controls keep the hot path as it was: the single UPDATE of cf_track has one more
-- predicate (NOT controlled). A controlled account (a daily, monthly or per-agent limit, a daily usage
-- alert, or registered agents) takes the full path: lock the balances row, ask cf_spend_gate (agent
-- paused? a limit with action ``pause`` that this event would exceed?), debit, then cf_spend_record
-- (counters, and an outbox row at each crossing). Counters live on rows the path already locks (balances)
-- or reaches by primary key (agents), are reset lazily by date, and are recomputed from the journal
-- whenever limits are saved (cf_refresh_spend), so a limit set mid-day counts the day's earlier usage.
-- Days are UTC days, months UTC calendar months.

-- Agents: the consumers that spend credits (the ``agent_id`` of usage events). Settings are written by
-- the API; ``status`` only by the account workflow (pause/resume), with every change in agent_events.
CREATE TABLE agents (
    account_id            text NOT NULL REFERENCES accounts (id),
    id                    text NOT NULL,
    name                  text NOT NULL DEFAULT '',
    status                text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'paused')),
    paused_by             text,  -- 'system' (a limit) or the operator/customer/service that paused it
    pause_reason          text,
    paused_at             timestamptz,
    resume_at             timestamptz,  -- a system pause ends by itself then (next UTC day / month)
    monthly_limit_micros  bigint CHECK (monthly_limit_micros > 0),
    limit_action          text CHECK (limit_action IN ('pause', 'alert_only')),  -- NULL: the account's
    on_plan_exhausted     text NOT NULL DEFAULT 'use_balance' CHECK (on_plan_exhausted IN ('stop', 'use_balance')),
    month_start           date,
    month_spent_micros    bigint NOT NULL DEFAULT 0 CHECK (month_spent_micros >= 0),
    metadata              jsonb,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, id),
    CHECK ((status = 'paused') = (paused_at IS NOT NULL))
);

CREATE TABLE agent_events (
    id          bigserial PRIMARY KEY,
    account_id  text NOT NULL,
    agent_id    text NOT NULL,
    action      text NOT NULL,  -- paused, resumed
    actor       text NOT NULL,  -- system, or who asked (operator name, service, customer key)
    reason      text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (account_id, agent_id) REFERENCES agents (account_id, id)
);
CREATE INDEX agent_events_agent ON agent_events (account_id, agent_id, id);

ALTER TABLE balances
    ADD COLUMN daily_limit_micros        bigint CHECK (daily_limit_micros > 0),
    ADD COLUMN monthly_limit_micros      bigint CHECK (monthly_limit_micros > 0),
    ADD COLUMN per_agent_limit_micros    bigint CHECK (per_agent_limit_micros > 0),
    ADD COLUMN limit_action              text NOT NULL DEFAULT 'pause' CHECK (limit_action IN ('pause', 'alert_only')),
    ADD COLUMN daily_usage_alert_micros  bigint CHECK (daily_usage_alert_micros > 0),
    ADD COLUMN day_start                 date,
    ADD COLUMN day_spent_micros          bigint NOT NULL DEFAULT 0 CHECK (day_spent_micros >= 0),
    ADD COLUMN month_start               date,
    ADD COLUMN month_spent_micros        bigint NOT NULL DEFAULT 0 CHECK (month_spent_micros >= 0),
    ADD COLUMN agent_controls            boolean NOT NULL DEFAULT false,
    ADD COLUMN controlled                boolean GENERATED ALWAYS AS (
        daily_limit_micros IS NOT NULL OR monthly_limit_micros IS NOT NULL OR per_agent_limit_micros IS NOT NULL
        OR daily_usage_alert_micros IS NOT NULL OR agent_controls) STORED;

-- Registering an agent puts its account on the controlled path (so pauses and agent limits are seen).
CREATE FUNCTION cf_agent_controls() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE balances SET agent_controls = true WHERE account_id = NEW.account_id AND NOT agent_controls;
    RETURN NULL;
END $$;
CREATE TRIGGER agents_controls AFTER INSERT ON agents FOR EACH ROW EXECUTE FUNCTION cf_agent_controls();

CREATE FUNCTION cf_utc_today() RETURNS date LANGUAGE sql STABLE AS $$ SELECT (now() AT TIME ZONE 'UTC')::date $$;

-- A limit reached (or an alert threshold crossed): one outbox row per scope and period (the dedup key
-- says which), however many events hit it.
CREATE FUNCTION cf_emit_spend_event(p_account text, p_kind text, p_scope text, p_agent text, p_period text,
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

-- May this event (``p_charge`` micro-credits for ``p_agent``) go ahead under the account's controls?
-- 'ok' or the denial code; with ``p_emit`` a denial by a limit also emits ``limit.reached`` (once per
-- period). The caller holds the balances row lock (a check without it reads a consistent snapshot).
CREATE FUNCTION cf_spend_gate(p_account text, p_agent text, p_charge bigint, p_emit boolean DEFAULT true)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    b record;
    v_today date := cf_utc_today();
    v_month date := date_trunc('month', cf_utc_today())::date;
    v_status text;
    v_limit bigint;
    v_action text;
    v_spent bigint;
BEGIN
    SELECT daily_limit_micros, monthly_limit_micros, per_agent_limit_micros, limit_action, day_start,
           day_spent_micros, month_start, month_spent_micros, agent_controls
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

-- Count an allowed charge against the day, the month and the agent, and emit what it crossed: a limit
-- reached (``limit.reached``, any action) and the daily usage alert (``usage.daily_threshold``).
-- The caller holds the balances row lock.
CREATE FUNCTION cf_spend_record(p_account text, p_agent text, p_charge bigint) RETURNS void LANGUAGE plpgsql AS $$
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
CREATE FUNCTION cf_refresh_spend(p_account text) RETURNS void LANGUAGE plpgsql AS $$
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

-- cf_track with spend control: the fast UPDATE now skips controlled accounts, which take the full path.
-- Settling a hold (key 'hold:...') is never refused by a limit or a pause (the usage happened; the hold
-- was checked when it was taken) but counts like any usage.
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
        SELECT balance_micros, held_micros, floor_micros, controlled INTO b
            FROM balances WHERE account_id = p_account FOR UPDATE;
        IF NOT FOUND THEN
            r.code := 'unknown_account';
            r.charged_micros := 0;
            RETURN r;
        END IF;
        IF b.held_micros > 0 AND cf_expire_holds(p_account) > 0 THEN
            SELECT balance_micros, held_micros, floor_micros, controlled INTO b
                FROM balances WHERE account_id = p_account;
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
        UPDATE balances SET balance_micros = balance_micros - r.charged_micros,
                            unburned_micros = unburned_micros + least(r.charged_micros, greatest(balance_micros, 0)),
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

-- Batches: accounts without controls keep the set-based path (renamed cf_track_batch_fast); a batch that
-- touches a controlled account is decided event by event through cf_track, in input order, so limits and
-- pauses hold exactly as for single events (a key repeated inside the batch replays, as before).
ALTER FUNCTION cf_track_batch(text[], text[], numeric[], text[], text[], bytea[], jsonb[])
    RENAME TO cf_track_batch_fast;
CREATE FUNCTION cf_track_batch(
    p_accounts text[], p_features text[], p_quantities numeric[], p_agents text[], p_keys text[],
    p_hashes bytea[], p_metadata jsonb[]
) RETURNS SETOF cf_track_result LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM balances WHERE account_id = ANY (p_accounts) AND controlled) THEN
        RETURN QUERY SELECT * FROM cf_track_batch_fast(p_accounts, p_features, p_quantities, p_agents, p_keys,
                                                       p_hashes, p_metadata);
        RETURN;
    END IF;
    PERFORM 1 FROM balances WHERE account_id = ANY (p_accounts) ORDER BY account_id FOR UPDATE;
    FOR i IN 1 .. coalesce(cardinality(p_accounts), 0) LOOP
        RETURN NEXT cf_track(p_accounts[i], p_features[i], p_quantities[i], p_agents[i], p_keys[i], p_hashes[i],
                             p_metadata[i], true);
    END LOOP;
END $$;

-- Holds: a controlled account's new hold passes the same gate as usage (a paused agent or a limit the
-- reserved amount would exceed refuses it); a repeated key still replays.
ALTER FUNCTION cf_hold(text, text, numeric, text, integer, text, bytea, jsonb) RENAME TO cf_hold_unchecked;
CREATE FUNCTION cf_hold(
    p_account text, p_feature text, p_quantity numeric, p_agent text, p_ttl_seconds integer,
    p_key text, p_hash bytea, p_metadata jsonb
) RETURNS cf_hold_result LANGUAGE plpgsql AS $$
DECLARE
    r cf_hold_result;
    b record;
    f cf_price_result;
    v_gate text;
BEGIN
    SELECT balance_micros, held_micros, floor_micros, controlled INTO b
        FROM balances WHERE account_id = p_account FOR UPDATE;
    IF FOUND AND b.controlled
            AND NOT EXISTS (SELECT 1 FROM holds WHERE account_id = p_account AND idempotency_key = p_key) THEN
        f := cf_price(p_feature, p_quantity);
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
