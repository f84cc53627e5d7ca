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
                           FROM journal x WHERE x.account_id = ev.account_id AND x.idempotency_key = ev.key
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

-- The wrapper (0013) planned its lock query afresh on every call: a custom plan for an array parameter always looks
-- cheaper than the generic one, so it was never cached.
ALTER FUNCTION cf_track_batch(text[], text[], numeric[], text[], text[], bytea[], jsonb[])
    SET plan_cache_mode = force_generic_plan;
