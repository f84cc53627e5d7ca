-- invoices: today's definitions (creditflow/ledger/functions_check.py and docs/development.md, "Database functions"). Edit here; no migration.
-- The payment of a period's invoice restores what that period billed and the credit line still carries, once
-- (journal ``overage_repayment`` under ``p_key``; nothing is written when nothing is left to restore). An invoice
-- without a closed period (issued directly) restores at most what it billed and what is drawn. Returns the micros
-- restored.
CREATE OR REPLACE FUNCTION cf_invoice_overage_restore(p_account text, p_period_key text, p_billed bigint, p_key text,
                                           p_description text, p_metadata jsonb) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_done bigint;
    v_restore bigint;
    r cf_post_result;
BEGIN
    PERFORM 1 FROM balances WHERE account_id = p_account FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown_account' USING ERRCODE = 'CF404';
    END IF;
    SELECT amount_micros INTO v_done FROM cf_journal_entry(p_account, p_key);
    IF FOUND THEN
        RETURN v_done;
    END IF;
    PERFORM cf_overage_sync(p_account);
    SELECT overage_open_micros INTO v_restore FROM billing_periods
        WHERE account_id = p_account AND period_key = p_period_key;
    IF NOT FOUND THEN
        SELECT least(p_billed, greatest(0, -balance_micros)) INTO v_restore FROM balances WHERE account_id = p_account;
    END IF;
    IF v_restore <= 0 THEN
        RETURN 0;
    END IF;
    r := cf_post(p_account, 'overage_repayment', v_restore, 'system:payments_clearing', p_description, p_metadata,
                 'adjustment', 10, NULL, p_key, NULL);
    UPDATE billing_periods SET overage_open_micros = overage_open_micros - v_restore
        WHERE account_id = p_account AND period_key = p_period_key;
    RETURN v_restore;
END $$;

-- Move ``p_amount`` micros between the wallet and the credit line restored by an invoice payment: negative takes a
-- restoration back (at most what the floor allows), positive restores again; once per key. Returns the micros moved
-- (signed). Caller: creditflow.invoicing.payment.
CREATE OR REPLACE FUNCTION cf_invoice_restoration_move(p_account text, p_period_key text, p_amount bigint, p_key text,
                                            p_description text, p_metadata jsonb) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    b record;
    v_done bigint;
    v_amount bigint := p_amount;
    r cf_post_result;
BEGIN
    SELECT balance_micros, held_micros, floor_micros INTO b FROM balances WHERE account_id = p_account FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown_account' USING ERRCODE = 'CF404';
    END IF;
    SELECT amount_micros INTO v_done FROM cf_journal_entry(p_account, p_key);
    IF FOUND THEN
        RETURN v_done;
    END IF;
    IF v_amount < 0 THEN
        v_amount := -least(-v_amount, greatest(b.balance_micros - b.held_micros - b.floor_micros, 0));
    ELSE  -- as for a payment (0024_2): only what the credit line still carries, never credits above zero
        v_amount := least(v_amount, greatest(0, -b.balance_micros));
    END IF;
    IF v_amount = 0 THEN
        RETURN 0;
    END IF;
    PERFORM cf_overage_sync(p_account);
    r := cf_post(p_account, CASE WHEN v_amount < 0 THEN 'overage_repayment_reversal' ELSE 'overage_repayment' END,
                 v_amount, 'system:payments_clearing', p_description, p_metadata, 'adjustment', 10, NULL, p_key, NULL);
    UPDATE billing_periods SET overage_open_micros = greatest(0, overage_open_micros - v_amount)
        WHERE account_id = p_account AND period_key = p_period_key;
    RETURN v_amount;
END $$;

-- One month of one rental, once (the row above is its key): charged to the wallet as a usage row, recorded unpaid,
-- or recorded as invoiced (the account has a plan). Under the balances row lock; what the wallet cannot cover down
-- to its floor is not charged at all (unpaid), like any usage.
CREATE OR REPLACE FUNCTION cf_rental_charge(p_account text, p_charge text, p_period_key text, p_quantity integer,
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
