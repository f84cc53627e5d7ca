-- refunds: today's definitions (creditflow/ledger/functions_check.py and docs/development.md, "Database functions"). Edit here; no migration.
-- Shared checks of the two wallet movements: the account lock, burns settled, holds expired, the key replayed.
-- Returns the replayed result when the key exists, else NULL with the lock held.
CREATE OR REPLACE FUNCTION cf_refund_prepare(p_account text, p_key text, p_hash bytea, p_amount bigint)
RETURNS cf_post_result LANGUAGE plpgsql AS $$
DECLARE
    r cf_post_result;
    b record;
    j record;
BEGIN
    IF p_amount IS NULL OR p_amount <= 0 THEN
        RAISE EXCEPTION 'invalid_amount' USING ERRCODE = 'CF400';
    END IF;
    IF p_key NOT LIKE 'sys:%' THEN  -- refunds are system postings: their keys cannot collide with a client's
        RAISE EXCEPTION 'invalid_amount' USING ERRCODE = 'CF400', DETAIL = 'refund keys start with sys:';
    END IF;
    SELECT held_micros INTO b FROM balances WHERE account_id = p_account FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown_account' USING ERRCODE = 'CF404';
    END IF;
    PERFORM cf_settle_burns(p_account);  -- the lot is about to be read and changed: bring lots up to date
    IF b.held_micros > 0 THEN
        PERFORM cf_expire_holds(p_account);
    END IF;
    SELECT id, request_hash, amount_micros, balance_after_micros INTO j
        FROM cf_journal_entry(p_account, p_key);
    IF FOUND THEN
        IF j.request_hash IS DISTINCT FROM p_hash THEN
            RAISE EXCEPTION 'idempotency_conflict' USING ERRCODE = 'CF409';
        END IF;
        SELECT held_micros, floor_micros INTO r.held_micros, r.floor_micros FROM balances WHERE account_id = p_account;
        r.txn_id := j.id;
        r.amount_micros := j.amount_micros;
        r.balance_micros := j.balance_after_micros;
        r.replayed := true;
        RETURN r;
    END IF;
    RETURN NULL;
END $$;

-- Finalize: Stripe refunded the money. No wallet movement (the reservation row is the refund's ledger
-- effect); the refund row records it. Idempotent: a succeeded refund stays as it is; a failed one is refused.
CREATE OR REPLACE FUNCTION cf_refund_finalize(p_refund text, p_stripe_refund text, p_stripe_status text)
RETURNS SETOF refunds LANGUAGE plpgsql AS $$
DECLARE
    f record;
BEGIN
    SELECT status, reserve_txn_id INTO f FROM refunds WHERE id = p_refund FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'not_found' USING ERRCODE = 'CF404';
    END IF;
    IF f.status = 'failed' OR f.reserve_txn_id IS NULL THEN
        RAISE EXCEPTION 'refund_not_reserved' USING ERRCODE = 'CF409';
    END IF;
    IF f.status <> 'succeeded' THEN
        UPDATE refunds SET status = 'succeeded', stripe_refund_id = coalesce(stripe_refund_id, p_stripe_refund),
                           stripe_status = p_stripe_status, failure_code = NULL, failure_message = NULL,
                           finalized_at = now(), updated_at = now()
            WHERE id = p_refund;
    END IF;
    RETURN QUERY SELECT * FROM refunds WHERE id = p_refund;
END $$;

-- Disputes closing as inquiries (issue 11, defect 8): a dispute closed ``warning_closed`` returns what it took, like
-- one closed ``won``, once (creditflow/payments/clawbacks.py; key sys:dispute_won:{dispute_id}).
--
-- cf_lot_return: credits taken from a purchase's lot come back to THAT lot (not to a new, unpriced one), so the
-- lot's price (paid_cents for original_micros, 0023_1) keeps describing what it holds and the credits stay
-- refundable with their purchase. As any grant and as cf_refund_release: what the account drew on its overage
-- line meanwhile is repaid first, the lot gets back only what ends up above zero, never more than its original.
-- System posting: key 'sys:...', replayed by key.
CREATE OR REPLACE FUNCTION cf_lot_return(
    p_account text, p_lot text, p_amount bigint, p_type text, p_book text, p_key text, p_description text,
    p_metadata jsonb
) RETURNS cf_post_result LANGUAGE plpgsql AS $$
DECLARE
    r cf_post_result;
    b record;
    l record;
    v_back bigint;
BEGIN
    r := cf_refund_prepare(p_account, p_key, NULL, p_amount);
    IF r.txn_id IS NOT NULL THEN
        r.lot_id := p_lot;
        RETURN r;
    END IF;
    SELECT original_micros, remaining_micros INTO l FROM credit_lots
        WHERE id = p_lot AND account_id = p_account FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown_purchase' USING ERRCODE = 'CF404';
    END IF;
    SELECT balance_micros, held_micros, floor_micros INTO b FROM balances WHERE account_id = p_account;
    r.balance_micros := b.balance_micros + p_amount;
    v_back := greatest(0, least(p_amount, r.balance_micros));
    IF l.remaining_micros + v_back > l.original_micros THEN
        RAISE EXCEPTION 'lot_return_exceeds_lot' USING ERRCODE = 'CF500';
    END IF;
    UPDATE credit_lots SET remaining_micros = remaining_micros + v_back,
                           depleted = (remaining_micros + v_back = 0)
        WHERE id = p_lot;
    UPDATE balances SET balance_micros = r.balance_micros, updated_at = now() WHERE account_id = p_account;
    r.held_micros := b.held_micros;
    r.floor_micros := b.floor_micros;
    r.amount_micros := p_amount;
    r.lot_id := p_lot;
    r.replayed := false;
    INSERT INTO journal (account_id, type, amount_micros, counter_book, balance_after_micros, description,
                         metadata, idempotency_key)
        VALUES (p_account, p_type, p_amount, p_book, r.balance_micros, p_description,
                nullif(p_metadata, '{}'::jsonb), p_key)
        RETURNING id INTO r.txn_id;
    RETURN r;
END $$;

-- Refunds and disputes of a purchase follow its credits through transfers (issue 13, item 2).
--
-- A transfer splits the purchase's lot: the credits moved live in new lots on other workspaces, linked to the
-- purchase's lot (origin_lot_id, 0031_2). Before, a Stripe-side refund or a dispute (cf_clawback_lot) and a refund
-- (cf_refund_reserve) looked only at the purchase's own lot, so moving the credits to another workspace before
-- disputing the payment kept them. Now they take from the purchase's lot first, then from the lots its credits
-- were moved to (oldest first), each such part a journal row on that workspace under the key ``<key>:<lot id>``
-- (same type, same book), in the same transaction. What they give back later (a refund released, a dispute won, a
-- Stripe refund failed) goes back to the lot each part came from (creditflow/payments/clawbacks.py,
-- cf_refund_release below). Every balance row involved is locked in account id order first (as cf_transfer does).
-- docs/organizations-and-transfers.md.

-- Lock the balance rows of the workspaces holding a purchase lot's credits (the lot's and its transfers'), in id
-- order.
CREATE OR REPLACE FUNCTION cf_lock_lot_family(p_account text, p_lot text) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM balances WHERE account_id = p_account
        OR account_id IN (SELECT account_id FROM credit_lots WHERE origin_lot_id = p_lot)
    ORDER BY account_id FOR UPDATE;
END $$;

-- What the parts of a clawback under p_key took from the lots p_lot's credits were moved to.
CREATE OR REPLACE FUNCTION cf_clawback_moved_taken(p_lot text, p_key text) RETURNS bigint LANGUAGE sql STABLE AS $$
    SELECT coalesce(sum(-j.amount_micros), 0)::bigint FROM credit_lots l
        CROSS JOIN LATERAL cf_journal_entry(l.account_id, p_key || ':' || l.id) j
    WHERE l.origin_lot_id = p_lot
$$;

-- Take up to p_max micros from one lot of one account, as cf_clawback_lot did (0027): never below the floor, active
-- holds that can no longer be covered cut. p_record_zero: write a row of 0 when nothing is left (the purchase's own
-- row: one ledger effect per Stripe object); a moved lot's part with nothing to take writes nothing.
CREATE OR REPLACE FUNCTION cf_clawback_part(
    p_account text, p_lot text, p_max bigint, p_type text, p_book text, p_key text, p_description text,
    p_metadata jsonb, p_record_zero boolean
) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    b record;
    v_remaining bigint;
    v_amount bigint;
BEGIN
    PERFORM cf_settle_burns(p_account);
    PERFORM cf_expire_holds(p_account);
    SELECT balance_micros, held_micros, floor_micros INTO b FROM balances WHERE account_id = p_account;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown_account' USING ERRCODE = 'CF404';
    END IF;
    SELECT remaining_micros INTO v_remaining FROM credit_lots WHERE id = p_lot AND account_id = p_account FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown_purchase' USING ERRCODE = 'CF404';
    END IF;
    v_amount := greatest(0, least(p_max, v_remaining, greatest(b.balance_micros - b.floor_micros, 0)));
    IF v_amount = 0 THEN
        IF p_record_zero THEN
            INSERT INTO journal (account_id, type, amount_micros, counter_book, balance_after_micros, description,
                                 metadata, idempotency_key)
                VALUES (p_account, p_type, 0, p_book, b.balance_micros, p_description || ' (nothing left to take)',
                        coalesce(p_metadata, '{}'::jsonb) || jsonb_build_object('wanted_micros', p_max), p_key);
        END IF;
        RETURN 0;
    END IF;
    PERFORM cf_cut_hold_reservations(p_account, b.held_micros - (b.balance_micros - v_amount - b.floor_micros));
    UPDATE credit_lots SET remaining_micros = remaining_micros - v_amount, depleted = (remaining_micros = v_amount)
        WHERE id = p_lot;
    UPDATE balances SET balance_micros = balance_micros - v_amount, updated_at = now() WHERE account_id = p_account;
    INSERT INTO journal (account_id, type, amount_micros, counter_book, balance_after_micros, description,
                         metadata, idempotency_key)
        VALUES (p_account, p_type, -v_amount, p_book, b.balance_micros - v_amount, p_description,
                nullif(p_metadata, '{}'::jsonb), p_key);
    RETURN v_amount;
END $$;

-- Re-declared from 0027 (same contract: returns what was taken in all, replayed by key): the purchase's own lot
-- first (its row under p_key, 0 if nothing), then the lots its credits were moved to.
CREATE OR REPLACE FUNCTION cf_clawback_lot(
    p_account text, p_lot text, p_max bigint, p_type text, p_book text, p_key text, p_description text,
    p_metadata jsonb
) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    v_done bigint;
    v_total bigint;
    d record;
BEGIN
    PERFORM cf_lock_lot_family(p_account, p_lot);
    PERFORM 1 FROM balances WHERE account_id = p_account;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown_account' USING ERRCODE = 'CF404';
    END IF;
    SELECT -amount_micros INTO v_done FROM cf_journal_entry(p_account, p_key);
    IF FOUND THEN
        RETURN v_done + cf_clawback_moved_taken(p_lot, p_key);
    END IF;
    v_total := cf_clawback_part(p_account, p_lot, p_max, p_type, p_book, p_key, p_description, p_metadata, true);
    FOR d IN SELECT id, account_id FROM credit_lots WHERE origin_lot_id = p_lot AND NOT depleted
             ORDER BY created_at, id LOOP
        EXIT WHEN v_total >= p_max;
        -- The part's row names the purchase (payment_intent_id) but not the money (amount_cents): the purchase's
        -- own row carries that once.
        v_total := v_total + cf_clawback_part(
            d.account_id, d.id, p_max - v_total, p_type, p_book, p_key || ':' || d.id,
            p_description || ' (credits moved here by a transfer)',
            (coalesce(p_metadata, '{}'::jsonb) - 'amount_cents')
                || jsonb_build_object('origin_lot_id', p_lot, 'origin_account_id', p_account, 'clawback_key', p_key),
            false);
    END LOOP;
    RETURN v_total;
END $$;

-- Re-declared from 0006: a refund of a purchase reserves its credits from the purchase's lot first, then from the
-- lots they were moved to (each part a ``refund`` row on that workspace under ``<key>:<lot id>``), all or nothing.
-- The remaining of the purchase counts its moved credits (creditflow/payments/refunds.py plans with it).
CREATE OR REPLACE FUNCTION cf_refund_reserve(
    p_account text, p_lot text, p_amount bigint, p_key text, p_hash bytea, p_description text, p_metadata jsonb
) RETURNS cf_post_result LANGUAGE plpgsql AS $$
DECLARE
    r cf_post_result;
    b record;
    l record;
    d record;
    db record;
    v_take bigint;
    v_left bigint;
    v_moved bigint := 0;
BEGIN
    PERFORM cf_lock_lot_family(p_account, p_lot);
    r := cf_refund_prepare(p_account, p_key, p_hash, p_amount);
    IF r.txn_id IS NOT NULL THEN
        r.lot_id := p_lot;
        RETURN r;
    END IF;
    SELECT source, remaining_micros INTO l FROM credit_lots WHERE id = p_lot AND account_id = p_account FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown_purchase' USING ERRCODE = 'CF404';
    END IF;
    IF l.source NOT IN ('purchase', 'auto_recharge') THEN
        RAISE EXCEPTION 'not_refundable' USING ERRCODE = 'CF422';
    END IF;
    FOR d IN SELECT DISTINCT account_id FROM credit_lots WHERE origin_lot_id = p_lot AND account_id <> p_account LOOP
        PERFORM cf_settle_burns(d.account_id);
        PERFORM cf_expire_holds(d.account_id);
    END LOOP;
    SELECT coalesce(sum(remaining_micros), 0) INTO v_moved FROM credit_lots WHERE origin_lot_id = p_lot;
    IF l.remaining_micros + v_moved < p_amount THEN
        RAISE EXCEPTION 'refund_exceeds_remaining' USING ERRCODE = 'CF422';
    END IF;
    v_take := least(p_amount, l.remaining_micros);
    SELECT balance_micros, held_micros, floor_micros INTO b FROM balances WHERE account_id = p_account;
    IF b.balance_micros - v_take - b.held_micros < b.floor_micros THEN
        RAISE EXCEPTION 'insufficient_credits' USING ERRCODE = 'CF402';
    END IF;
    UPDATE credit_lots SET remaining_micros = remaining_micros - v_take, depleted = (remaining_micros = v_take)
        WHERE id = p_lot;
    UPDATE balances SET balance_micros = balance_micros - v_take, updated_at = now() WHERE account_id = p_account;
    r.balance_micros := b.balance_micros - v_take;
    r.held_micros := b.held_micros;
    r.floor_micros := b.floor_micros;
    r.amount_micros := -v_take;
    r.lot_id := p_lot;
    r.replayed := false;
    INSERT INTO journal (account_id, type, amount_micros, counter_book, balance_after_micros, description,
                         metadata, idempotency_key, request_hash)
        VALUES (p_account, 'refund', -v_take, 'system:refund_reserve', r.balance_micros, p_description,
                nullif(p_metadata, '{}'::jsonb), p_key, p_hash)
        RETURNING id INTO r.txn_id;
    v_left := p_amount - v_take;
    FOR d IN SELECT id, account_id FROM credit_lots WHERE origin_lot_id = p_lot AND NOT depleted
             ORDER BY created_at, id FOR UPDATE LOOP
        EXIT WHEN v_left = 0;
        SELECT remaining_micros INTO v_take FROM credit_lots WHERE id = d.id;
        v_take := least(v_left, v_take);
        SELECT balance_micros, held_micros, floor_micros INTO db FROM balances WHERE account_id = d.account_id;
        IF db.balance_micros - v_take - db.held_micros < db.floor_micros THEN
            RAISE EXCEPTION 'insufficient_credits' USING ERRCODE = 'CF402';  -- a hold there reserves them
        END IF;
        UPDATE credit_lots SET remaining_micros = remaining_micros - v_take, depleted = (remaining_micros = v_take)
            WHERE id = d.id;
        UPDATE balances SET balance_micros = balance_micros - v_take, updated_at = now()
            WHERE account_id = d.account_id;
        INSERT INTO journal (account_id, type, amount_micros, counter_book, balance_after_micros, description,
                             metadata, idempotency_key, request_hash)
            VALUES (d.account_id, 'refund', -v_take, 'system:refund_reserve', db.balance_micros - v_take,
                    p_description || ' (credits moved here by a transfer)',
                    coalesce(p_metadata, '{}'::jsonb) - 'amount_cents'
                        || jsonb_build_object('origin_lot_id', p_lot, 'origin_account_id', p_account),
                    p_key || ':' || d.id, p_hash);
        IF d.account_id = p_account THEN
            r.balance_micros := r.balance_micros - v_take;
        END IF;
        v_left := v_left - v_take;
    END LOOP;
    RETURN r;
END $$;

-- Re-declared from 0006: a released refund gives each part back to the lot it was reserved from (the purchase's
-- part here under p_key; each moved part under ``<p_key>:<lot id>`` on its workspace). The reservation's key is
-- the release's with ``sys:refund_release:`` for ``sys:refund:`` (creditflow/payments/refunds.py names both).
CREATE OR REPLACE FUNCTION cf_refund_release(
    p_account text, p_lot text, p_amount bigint, p_key text, p_hash bytea, p_description text, p_metadata jsonb
) RETURNS cf_post_result LANGUAGE plpgsql AS $$
DECLARE
    r cf_post_result;
    b record;
    l record;
    d record;
    v_back bigint;
    v_own bigint;
    v_reserve_key text := 'sys:refund:' || substr(p_key, length('sys:refund_release:') + 1);
BEGIN
    PERFORM cf_lock_lot_family(p_account, p_lot);
    r := cf_refund_prepare(p_account, p_key, p_hash, p_amount);
    IF r.txn_id IS NOT NULL THEN
        r.lot_id := p_lot;
        RETURN r;
    END IF;
    -- The moved parts first (each back to its own lot, as cf_lot_return does), then the purchase's own part.
    v_own := p_amount;
    FOR d IN SELECT l2.id, l2.account_id, -j.amount_micros AS taken FROM credit_lots l2
             CROSS JOIN LATERAL cf_journal_entry(l2.account_id, v_reserve_key || ':' || l2.id) j
             WHERE l2.origin_lot_id = p_lot AND j.amount_micros < 0 ORDER BY l2.created_at, l2.id LOOP
        PERFORM cf_lot_return(d.account_id, d.id, d.taken, 'refund_reversal', 'system:refund_reserve',
                              p_key || ':' || d.id, p_description || ' (credits moved here by a transfer)',
                              coalesce(p_metadata, '{}'::jsonb)
                                  || jsonb_build_object('origin_lot_id', p_lot, 'origin_account_id', p_account));
        v_own := v_own - d.taken;
    END LOOP;
    SELECT original_micros, remaining_micros INTO l FROM credit_lots
        WHERE id = p_lot AND account_id = p_account FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown_purchase' USING ERRCODE = 'CF404';
    END IF;
    SELECT balance_micros, held_micros, floor_micros INTO b FROM balances WHERE account_id = p_account;
    r.balance_micros := b.balance_micros + v_own;
    v_back := greatest(0, least(v_own, r.balance_micros));
    IF l.remaining_micros + v_back > l.original_micros THEN
        RAISE EXCEPTION 'refund_release_exceeds_lot' USING ERRCODE = 'CF500';
    END IF;
    UPDATE credit_lots SET remaining_micros = remaining_micros + v_back,
                           depleted = (remaining_micros + v_back = 0)
        WHERE id = p_lot;
    UPDATE balances SET balance_micros = r.balance_micros, updated_at = now() WHERE account_id = p_account;
    r.held_micros := b.held_micros;
    r.floor_micros := b.floor_micros;
    r.amount_micros := v_own;
    r.lot_id := p_lot;
    r.replayed := false;
    INSERT INTO journal (account_id, type, amount_micros, counter_book, balance_after_micros, description,
                         metadata, idempotency_key, request_hash)
        VALUES (p_account, 'refund_reversal', v_own, 'system:refund_reserve', r.balance_micros, p_description,
                nullif(p_metadata, '{}'::jsonb), p_key, p_hash)
        RETURNING id INTO r.txn_id;
    RETURN r;
END $$;
