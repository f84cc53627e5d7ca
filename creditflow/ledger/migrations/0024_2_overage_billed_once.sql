-- Issue 11, defects 3 and 4: each unit of overage is billed once and repaid once.
--
-- Before: a period's close billed the whole negative balance, the next plan grant repaid the credit line out of its
-- plan credits, and the invoice's payment credited the billed overage again as a permanent lot (defect 3); an
-- invoice still unpaid at the next close had its negative balance billed again (defect 4).
--
-- Now every closed period keeps ``overage_open_micros``: the part of the overage it billed that the credit line
-- still carries. Whatever credits reach the wallet afterwards (the next plan grant, a top-up...) repay the credit
-- line, and so shrink the open amounts: the drawn part not billed yet first, then billed overage oldest period
-- first (cf_overage_sync keeps sum(open) <= what is drawn). A close bills only what is drawn beyond the open
-- amounts (rounded down to whole credits, creditflow.domain.invoices.billable_overage_micros); the invoice's
-- payment restores only its period's open amount (cf_invoice_overage_restore), once.
ALTER TABLE billing_periods
    ADD COLUMN overage_open_micros bigint NOT NULL DEFAULT 0 CHECK (overage_open_micros >= 0);

-- Periods whose invoice is not paid yet still carry what they billed (the next sync trims it to what is drawn).
UPDATE billing_periods p SET overage_open_micros = p.overage_micros
    WHERE NOT EXISTS (SELECT 1 FROM invoices i WHERE i.account_id = p.account_id AND i.period_key = p.period_key
                      AND i.status = 'paid');

-- Trim the account's open billed overage to what the credit line still carries, oldest period first; returns the
-- total still open. Caller holds the balances row lock.
CREATE FUNCTION cf_overage_sync(p_account text) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    v_drawn bigint;
    v_open bigint;
    v_excess bigint;
    v_take bigint;
    p record;
BEGIN
    SELECT greatest(0, -balance_micros) INTO v_drawn FROM balances WHERE account_id = p_account;
    SELECT coalesce(sum(overage_open_micros), 0) INTO v_open FROM billing_periods WHERE account_id = p_account;
    v_excess := v_open - v_drawn;
    IF v_excess <= 0 THEN
        RETURN v_open;
    END IF;
    FOR p IN SELECT period_key, overage_open_micros FROM billing_periods
             WHERE account_id = p_account AND overage_open_micros > 0 ORDER BY period_start, period_key
    LOOP
        v_take := least(p.overage_open_micros, v_excess);
        UPDATE billing_periods SET overage_open_micros = overage_open_micros - v_take
            WHERE account_id = p_account AND period_key = p.period_key;
        v_excess := v_excess - v_take;
        EXIT WHEN v_excess = 0;
    END LOOP;
    RETURN v_drawn;
END $$;

-- The payment of a period's invoice restores what that period billed and the credit line still carries, once
-- (journal ``overage_repayment`` under ``p_key``; nothing is written when nothing is left to restore). An invoice
-- without a closed period (issued directly) restores at most what it billed and what is drawn. Returns the micros
-- restored.
CREATE FUNCTION cf_invoice_overage_restore(p_account text, p_period_key text, p_billed bigint, p_key text,
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
    SELECT amount_micros INTO v_done FROM journal WHERE account_id = p_account AND idempotency_key = p_key;
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
