-- Issue 11, defect 8 (invoices): a refund or a dispute of an invoice payment was ignored (the invoice stayed paid,
-- the credit line it restored stayed restored).
--
-- Rule (creditflow/invoicing/payment.py, apply_stripe_event):
-- * a refund made on Stripe (``charge.refunded``) adds to ``invoices.refunded_cents``; refunded in full, the invoice
--   is ``refunded``. The credit-line restoration its payment made is reversed in the refund's proportion (rounded up
--   to the micro-credit, against the customer), at most what was restored;
-- * a dispute (``charge.dispute.created``) makes it ``disputed`` and reverses the whole restoration; closed ``won``
--   or ``warning_closed`` (the money stays with us) it is ``paid`` again and the restoration is made again; closed
--   lost it stays ``disputed``.
-- A reversal never takes the balance below its floor (what the floor stops is not taken, as for purchase
-- clawbacks); what it takes is drawn on the credit line again, so it goes back to the period's open billed overage
-- (billing_periods.overage_open_micros: billed once, never billed again by a later close).
ALTER TABLE invoices DROP CONSTRAINT invoices_status_check;
ALTER TABLE invoices ADD CONSTRAINT invoices_status_check
    CHECK (status IN ('draft', 'open', 'paid', 'past_due', 'void', 'refunded', 'disputed'));
ALTER TABLE invoices ADD COLUMN refunded_cents bigint NOT NULL DEFAULT 0 CHECK (refunded_cents >= 0);
ALTER TABLE invoices DROP CONSTRAINT paid_has_time;
ALTER TABLE invoices ADD CONSTRAINT paid_has_time
    CHECK (status NOT IN ('paid', 'refunded', 'disputed') OR paid_at IS NOT NULL);

-- Move ``p_amount`` micros between the wallet and the credit line restored by an invoice payment: negative takes a
-- restoration back (at most what the floor allows), positive restores again; once per key. Returns the micros moved
-- (signed). Caller: creditflow.invoicing.payment.
CREATE FUNCTION cf_invoice_restoration_move(p_account text, p_period_key text, p_amount bigint, p_key text,
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
    SELECT amount_micros INTO v_done FROM journal WHERE account_id = p_account AND idempotency_key = p_key;
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

-- Each refund or dispute outcome of an invoice payment is applied once (written in the transaction that applies it).
CREATE TABLE invoice_payment_events (
    invoice_id    text NOT NULL REFERENCES invoices (id),
    stripe_id     text NOT NULL,
    kind          text NOT NULL CHECK (kind IN ('refund', 'dispute', 'dispute_won', 'dispute_lost')),
    amount_cents  bigint NOT NULL CHECK (amount_cents >= 0),
    moved_micros  bigint NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (invoice_id, stripe_id, kind)
);
