-- Refunds of purchased credits (issue 3, refunds): the refund record and the ledger functions of the saga.
--
-- refunds: one row per refund request, (account_id, request_id) unique. The row is written in the same
-- transaction as the reservation (cf_refund_reserve), so a refused request leaves nothing behind. Like
-- stripe_charges it guards the Stripe call (localstripe ignores idempotency keys): status ``refunding`` is
-- committed before Stripe is called, the Stripe refund id right after, and a retry that finds the id
-- retrieves that refund instead of creating another. Rows are written by creditflow/payments/refunds.py only.
--
-- The ledger effect of a refund is ONE journal row, the reservation: type ``refund`` ("Refund of ..."),
-- from the wallet to ``system:refund_reserve``, taken from the purchase's own lot (not through the burn
-- order). If Stripe refuses for good, a ``refund_reversal`` row puts the credits back into the same lot
-- (compensation). A succeeded refund needs no wallet movement, so finalization is recorded on this row
-- (status ``succeeded``, stripe_refund_id, finalized_at) rather than in the journal: every journal row
-- must have a wallet leg. ``system:refund_reserve`` therefore holds exactly the refunded credits
-- (succeeded or in flight) and no released ones.
CREATE TABLE refunds (
    id                 text PRIMARY KEY CHECK (id ~ '^ref_[0-9a-f]{32}$'),
    account_id         text NOT NULL REFERENCES accounts (id),
    request_id         text NOT NULL,
    charge_id          text NOT NULL REFERENCES stripe_charges (id),
    payment_intent_id  text NOT NULL,
    purchase_txn_id    uuid NOT NULL,
    lot_id             text NOT NULL REFERENCES credit_lots (id),
    credits            bigint NOT NULL CHECK (credits > 0),
    amount_cents       bigint NOT NULL CHECK (amount_cents > 0),
    reason             text NOT NULL CHECK (reason IN ('requested_by_customer', 'duplicate_charge', 'billing_error')),
    requested_by       text NOT NULL DEFAULT 'customer',
    status             text NOT NULL DEFAULT 'reserved'
                       CHECK (status IN ('reserved', 'refunding', 'succeeded', 'failed')),
    reserve_txn_id     uuid,
    release_txn_id     uuid,
    stripe_refund_id   text UNIQUE CHECK (stripe_refund_id LIKE 're\_%'),
    stripe_status      text,
    failure_code       text,
    failure_message    text,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    finalized_at       timestamptz,
    UNIQUE (account_id, request_id),
    CONSTRAINT succeeded_has_refund CHECK (status <> 'succeeded' OR stripe_refund_id IS NOT NULL),
    CONSTRAINT failed_was_released CHECK (status <> 'failed' OR release_txn_id IS NOT NULL OR reserve_txn_id IS NULL)
);
CREATE INDEX refunds_account_created ON refunds (account_id, created_at DESC);
CREATE INDEX refunds_charge ON refunds (charge_id);

-- Shared checks of the two wallet movements: the account lock, burns settled, holds expired, the key replayed.
-- Returns the replayed result when the key exists, else NULL with the lock held.
CREATE FUNCTION cf_refund_prepare(p_account text, p_key text, p_hash bytea, p_amount bigint)
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
        FROM journal WHERE account_id = p_account AND idempotency_key = p_key;
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

-- Reserve: take p_amount micros out of ONE lot (the purchase's) and the wallet, into system:refund_reserve.
-- The credits stop being spendable at once. Refused (nothing written): a lot that is not this account's
-- (unknown_purchase), not purchased (not_refundable), holding less than p_amount (refund_exceeds_remaining),
-- or a balance that would go below the floor with the active holds (insufficient_credits).
CREATE FUNCTION cf_refund_reserve(
    p_account text, p_lot text, p_amount bigint, p_key text, p_hash bytea, p_description text, p_metadata jsonb
) RETURNS cf_post_result LANGUAGE plpgsql AS $$
DECLARE
    r cf_post_result;
    b record;
    l record;
BEGIN
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
    IF l.remaining_micros < p_amount THEN
        RAISE EXCEPTION 'refund_exceeds_remaining' USING ERRCODE = 'CF422';
    END IF;
    SELECT balance_micros, held_micros, floor_micros INTO b FROM balances WHERE account_id = p_account;
    IF b.balance_micros - p_amount - b.held_micros < b.floor_micros THEN
        RAISE EXCEPTION 'insufficient_credits' USING ERRCODE = 'CF402';
    END IF;
    -- Lots hold exactly max(balance, 0) after settling, so the lot's credits are part of a positive balance:
    -- taking them from the lot and the balance together keeps sum(remaining) = max(balance, 0).
    UPDATE credit_lots SET remaining_micros = remaining_micros - p_amount, depleted = (remaining_micros = p_amount)
        WHERE id = p_lot;
    UPDATE balances SET balance_micros = balance_micros - p_amount, updated_at = now() WHERE account_id = p_account;
    r.balance_micros := b.balance_micros - p_amount;
    r.held_micros := b.held_micros;
    r.floor_micros := b.floor_micros;
    r.amount_micros := -p_amount;
    r.lot_id := p_lot;
    r.replayed := false;
    INSERT INTO journal (account_id, type, amount_micros, counter_book, balance_after_micros, description,
                         metadata, idempotency_key, request_hash)
        VALUES (p_account, 'refund', -p_amount, 'system:refund_reserve', r.balance_micros, p_description,
                nullif(p_metadata, '{}'::jsonb), p_key, p_hash)
        RETURNING id INTO r.txn_id;
    RETURN r;
END $$;

-- Release (compensation): the reserved credits go back to the wallet and to the same lot, as a
-- ``refund_reversal`` row. Like any grant, what the account drew on its overage line meanwhile is repaid
-- first: the lot gets back only what ends up above zero (never more than its original size).
CREATE FUNCTION cf_refund_release(
    p_account text, p_lot text, p_amount bigint, p_key text, p_hash bytea, p_description text, p_metadata jsonb
) RETURNS cf_post_result LANGUAGE plpgsql AS $$
DECLARE
    r cf_post_result;
    b record;
    l record;
    v_back bigint;
BEGIN
    r := cf_refund_prepare(p_account, p_key, p_hash, p_amount);
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
        RAISE EXCEPTION 'refund_release_exceeds_lot' USING ERRCODE = 'CF500';
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
                         metadata, idempotency_key, request_hash)
        VALUES (p_account, 'refund_reversal', p_amount, 'system:refund_reserve', r.balance_micros, p_description,
                nullif(p_metadata, '{}'::jsonb), p_key, p_hash)
        RETURNING id INTO r.txn_id;
    RETURN r;
END $$;

-- Finalize: Stripe refunded the money. No wallet movement (the reservation row is the refund's ledger
-- effect); the refund row records it. Idempotent: a succeeded refund stays as it is; a failed one is refused.
CREATE FUNCTION cf_refund_finalize(p_refund text, p_stripe_refund text, p_stripe_status text)
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
