-- metering: today's definitions (creditflow/ledger/functions_check.py and docs/development.md, "Database functions"). Edit here; no migration.
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
ALTER FUNCTION cf_track_batch(text[], text[], numeric[], text[], text[], bytea[], jsonb[])
    SET plan_cache_mode = force_generic_plan;

-- Metering batches that cost what their events cost (issue 2).
--
-- cf_track_batch_fast (0002's set-based batch, renamed in 0009) runs with a generic plan (array parameters). With
-- some statistics (a few hundred accounts, a young journal) that plan looked up the prior journal rows and the
-- balances with hash joins, hashing the whole balances table on every call: about 0.5 ms per call, so batches of a
-- few events cost more than the events one by one. The lookups are now a parameterized probe per event; the rest of
-- the function is unchanged, except that it no longer locks the balances rows a second time (its caller does). On the
-- benchmark's 10,000 analyzed accounts the old plan was already nested loops, so
-- there the gain is small (batches of 7: 8,630 -> 9,037 events/s).

CREATE OR REPLACE FUNCTION cf_track_batch_fast(
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
    -- The only caller, cf_track_batch (0013), has already locked every account's balances row, in id order.
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
        -- One index probe per event: OFFSET 0 keeps the planner from flattening these into hash joins (the generic
        -- plan picked them, reading every balances row on every call). Not LIMIT 1, which costs a sequential scan
        -- as cheap as finding its first match.
        LEFT JOIN LATERAL (SELECT x.id, x.request_hash, x.amount_micros, x.balance_after_micros, x.credits_per_unit
                           FROM cf_journal_entry(ev.account_id, ev.key) x
                           OFFSET 0) j ON true
        LEFT JOIN LATERAL (SELECT y.balance_micros, y.held_micros, y.floor_micros
                           FROM balances y WHERE y.account_id = ev.account_id OFFSET 0) b ON true
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

-- The coalescer's groups in one call (issue 2): cf_track for each event, in the order given, in the caller's
-- transaction. Unlike cf_track_batch this is not set-based: every event moves its account's balance on its own,
-- so the balance watch (auto-recharge, alerts) sees each event's balance exactly as for single calls. What it
-- saves is per-event overhead: one statement, one round trip and one commit for the whole group, and on the
-- client one set of array parameters instead of one execute per event.
--
-- Callers pass the events sorted by account (stable: arrival order within an account), so concurrent groups lock
-- balances rows in one order and cannot deadlock. p_probe as in cf_track.
CREATE OR REPLACE FUNCTION cf_track_group(
    p_accounts text[], p_features text[], p_quantities numeric[], p_agents text[], p_keys text[],
    p_hashes bytea[], p_metadata jsonb[], p_probe boolean DEFAULT true
) RETURNS SETOF cf_track_result LANGUAGE plpgsql AS $$
BEGIN
    FOR i IN 1 .. coalesce(array_length(p_accounts, 1), 0) LOOP
        RETURN NEXT cf_track(p_accounts[i], p_features[i], p_quantities[i], p_agents[i], p_keys[i],
                             p_hashes[i], p_metadata[i], p_probe);
    END LOOP;
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
    k record;
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
        -- The key first, alone: for a new key (the usual case) the statement never opens the journal's monthly
        -- partitions (cf_journal_entry's join initializes a scan of each one per call, about 7 % of the server's
        -- CPU per event); a replay then reads its one row.
        SELECT created_at, seq INTO k FROM journal_keys WHERE account_id = p_account AND idempotency_key = p_key;
        IF FOUND THEN
            SELECT id, request_hash, amount_micros, balance_after_micros, credits_per_unit INTO j FROM journal
                WHERE account_id = p_account AND created_at = k.created_at AND seq = k.seq;
        END IF;
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
