-- Issue 11, defect 2: a hold across a renewal kept plan credits alive.
--
-- Plan credit expiry (0018) left whatever active holds reserved: hold the whole plan balance over the boundary,
-- release it after, and the closed period's plan credits were spendable in the next period (repeatable every
-- period). Now:
--
-- * Plan credits of a closed period expire in full, whatever is held (cf_expire_plan_credits).
-- * Holds keep reserving only what the account can still cover: when the expiry would take the available balance
--   (balance - held) below the floor, the active holds' reservations are cut by the shortfall, newest hold first
--   (cf_cut_hold_reservations; holds.amount_micros is what a hold reserves now, the cut is in the new column
--   ``holds.reservation_cut_micros``). Releasing a hold releases what it still reserves: nothing comes back.
-- * The settlement of a hold whose reservation was cut is never refused for want of credits (the usage happened):
--   it is priced like any event and charged from the next source in burn order (the next lots, then the overage
--   credit line); what the account cannot cover down to its floor is not charged and is recorded on the usage
--   row's metadata as ``uncovered_micros`` (cf_hold_settle). Other holds settle as before (0002).

ALTER TABLE holds ADD COLUMN reservation_cut_micros bigint NOT NULL DEFAULT 0 CHECK (reservation_cut_micros >= 0);

-- Cut active holds' reservations by ``p_amount`` micros, newest hold first. Caller holds the balances row lock.
CREATE FUNCTION cf_cut_hold_reservations(p_account text, p_amount bigint) RETURNS bigint
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

-- As in 0018, but held credits do not cap the expiry: the plan lots (of periods ending by ``p_until``) expire up to
-- ``p_max``; holds that can no longer be covered are cut first so the floor check holds.
CREATE OR REPLACE FUNCTION cf_expire_plan_credits(p_account text, p_key text, p_description text, p_max bigint,
                                                  p_until timestamptz) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_left bigint;
    v_done bigint;
    v_short bigint;
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
    -- Plan lots burn in expiry order, so burning this amount takes it from exactly these (earliest) lots. The lots
    -- hold max(balance, 0) once burns are settled, so this never takes the balance below zero.
    SELECT least(coalesce(sum(remaining_micros), 0), p_max, greatest(b.balance_micros - b.floor_micros, 0))
        INTO v_left FROM credit_lots WHERE account_id = p_account AND source = 'plan' AND NOT depleted
        AND (p_until IS NULL OR expires_at IS NULL OR expires_at <= p_until);
    IF v_left <= 0 THEN
        RETURN 0;
    END IF;
    v_short := b.held_micros - (b.balance_micros - v_left - b.floor_micros);
    IF v_short > 0 THEN
        PERFORM cf_cut_hold_reservations(p_account, v_short);
    END IF;
    r := cf_post(p_account, 'plan_expiry', -v_left, 'system:breakage', p_description, NULL, 'plan', 0, NULL, p_key,
                 NULL);
    RETURN v_left;
END $$;

-- As in 0002, but a hold whose reservation was cut (above) is never refused for want of credits: when cf_track
-- refuses (insufficient_credits), the usage is charged down to the floor here, on the same key and request hash cf_track would have used (so a retry replays
-- it), and the part not covered is on the row's metadata (``uncovered_micros``).
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
        SELECT balance_micros, held_micros, floor_micros, controlled, plan_id, plan_left_micros INTO b
            FROM balances WHERE account_id = p_account;
        f := cf_plan_price(cf_price(h.feature_id, p_quantity), b.plan_id, h.feature_id, p_quantity,
                           b.plan_left_micros > 0);
        v_price := f.charge_micros;
        r.charged_micros := least(v_price, greatest(0, b.balance_micros - b.held_micros - b.floor_micros));
        UPDATE balances SET balance_micros = balance_micros - r.charged_micros,
                            unburned_micros = unburned_micros + least(r.charged_micros, greatest(balance_micros, 0)),
                            plan_left_micros = greatest(0, plan_left_micros
                                                           - least(r.charged_micros, greatest(balance_micros, 0))),
                            updated_at = now()
            WHERE account_id = p_account
            RETURNING balance_micros, held_micros, floor_micros INTO r.balance_micros, r.held_micros, r.floor_micros;
        IF b.controlled AND r.charged_micros > 0 THEN
            PERFORM cf_spend_record(p_account, h.agent_id, r.charged_micros);
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
