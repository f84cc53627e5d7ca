-- Number rental in the wallet (issue 13, item 8; seed 004 "Phone numbers - a recurring monthly rental"). A wallet-only
-- account pays each recurring charge (its own quantity x unit price) from the wallet once a month, as a usage item
-- with channel ``number`` (feature ``phone_number``), driven by a durable monthly workflow per charge
-- (``RentalWorkflow``, ``rental:{account_id}:{charge_id}``). Plan accounts keep it as an invoice line: a month that
-- starts while the account has an active plan is not charged to the wallet (status ``invoiced``), never both.
-- A month the wallet cannot cover (down to the overage credit line's floor, if there is one) is recorded ``unpaid``
-- and the customer is notified (``recurring_charge.failed``).
CREATE TABLE rental_charges (
    charge_id      text NOT NULL REFERENCES recurring_charges (id),
    period_key     text NOT NULL,  -- the month of the rental (its start, UTC date)
    account_id     text NOT NULL REFERENCES accounts (id),
    amount_micros  bigint NOT NULL CHECK (amount_micros >= 0),
    status         text NOT NULL CHECK (status IN ('paid', 'unpaid', 'invoiced')),
    txn_id         uuid,
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (charge_id, period_key)
);
CREATE INDEX rental_charges_account ON rental_charges (account_id, created_at);

-- One month of one rental, once (the row above is its key): charged to the wallet as a usage row, recorded unpaid,
-- or recorded as invoiced (the account has a plan). Under the balances row lock; what the wallet cannot cover down
-- to its floor is not charged at all (unpaid), like any usage.
CREATE FUNCTION cf_rental_charge(p_account text, p_charge text, p_period_key text, p_quantity integer,
                                 p_unit_price bigint, p_description text, p_invoiced boolean)
RETURNS TABLE (status text, txn_id uuid, amount_micros bigint, created boolean) LANGUAGE plpgsql AS $$
DECLARE
    b record;
    x record;
    v_amount bigint := p_quantity::bigint * p_unit_price;
    v_txn uuid;
BEGIN
    SELECT balance_micros, held_micros, floor_micros, controlled INTO b
        FROM balances WHERE account_id = p_account FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown_account' USING ERRCODE = 'CF404';
    END IF;
    SELECT r.status, r.txn_id, r.amount_micros INTO x FROM rental_charges r
        WHERE r.charge_id = p_charge AND r.period_key = p_period_key;
    IF FOUND THEN
        RETURN QUERY SELECT x.status, x.txn_id, x.amount_micros, false;
        RETURN;
    END IF;
    IF p_invoiced THEN
        INSERT INTO rental_charges (charge_id, period_key, account_id, amount_micros, status)
            VALUES (p_charge, p_period_key, p_account, v_amount, 'invoiced');
        RETURN QUERY SELECT 'invoiced'::text, NULL::uuid, v_amount, true;
        RETURN;
    END IF;
    IF b.held_micros > 0 AND cf_expire_holds(p_account) > 0 THEN
        SELECT balance_micros, held_micros, floor_micros, controlled INTO b FROM balances WHERE account_id = p_account;
    END IF;
    IF b.balance_micros - b.held_micros - v_amount < b.floor_micros THEN
        INSERT INTO rental_charges (charge_id, period_key, account_id, amount_micros, status)
            VALUES (p_charge, p_period_key, p_account, v_amount, 'unpaid');
        RETURN QUERY SELECT 'unpaid'::text, NULL::uuid, v_amount, true;
        RETURN;
    END IF;
    UPDATE balances SET balance_micros = balance_micros - v_amount,
                        unburned_micros = unburned_micros + least(v_amount, greatest(balance_micros, 0)),
                        plan_left_micros = greatest(0, plan_left_micros - least(v_amount, greatest(balance_micros, 0))),
                        updated_at = now()
        WHERE account_id = p_account RETURNING balance_micros INTO b.balance_micros;
    IF b.controlled THEN
        PERFORM cf_spend_record(p_account, NULL, v_amount);
    END IF;
    INSERT INTO journal (account_id, type, amount_micros, counter_book, balance_after_micros, description,
                         feature_id, channel, quantity, credits_per_unit, idempotency_key, metadata)
        VALUES (p_account, 'usage', -v_amount, 'system:usage_revenue', b.balance_micros, p_description,
                'phone_number', 'number', p_quantity, p_unit_price / 1000000.0,
                'sys:rental:' || p_charge || ':' || p_period_key,
                jsonb_build_object('recurring_charge_id', p_charge, 'period', p_period_key))
        RETURNING id INTO v_txn;
    INSERT INTO rental_charges (charge_id, period_key, account_id, amount_micros, status, txn_id)
        VALUES (p_charge, p_period_key, p_account, v_amount, 'paid', v_txn);
    RETURN QUERY SELECT 'paid'::text, v_txn, v_amount, true;
END $$;
