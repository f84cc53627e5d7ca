-- Auto-recharge (issue 3): per-account settings, balance watches on the hot path, recharge charges.
--
-- auto_recharge_settings: written by the API (PUT /api/v1/billing/auto-recharge), read by the account
-- workflow's activities. ``generation`` grows on every PUT, so the workflow knows when its failure
-- counter belongs to settings that were replaced (a re-enable after "disabled after N failures" starts
-- afresh). ``enabled`` is set false by the workflow only for the generation it judged (never clobbering a
-- newer PUT). ``consecutive_failures`` / ``last_*`` mirror the workflow's state for GET.
CREATE TABLE auto_recharge_settings (
    account_id            text PRIMARY KEY REFERENCES accounts (id),
    enabled               boolean NOT NULL,
    threshold_micros      bigint NOT NULL CHECK (threshold_micros > 0),
    amount_credits        bigint NOT NULL CHECK (amount_credits > 0),
    payment_method_id     text,
    generation            bigint NOT NULL DEFAULT 1,
    disabled_reason       text,
    consecutive_failures  integer NOT NULL DEFAULT 0,
    last_attempt_at       timestamptz,
    last_status           text,
    last_error            text,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now()
);

-- Balance watches: the thresholds (micro-credits of *available* balance = balance - held) whose downward
-- crossing must reach the account workflow. Kept on the balances row so the hot path sees them without
-- another read; a trigger whose WHEN clause is false for almost every update (no watch, or available not
-- falling) writes an outbox row only at the crossing itself: ``balance.below_threshold``, once per
-- threshold and transaction. Maintained by cf_refresh_watch (later issues add alert thresholds there).
ALTER TABLE balances ADD COLUMN watch_below_micros bigint[] NOT NULL DEFAULT '{}';

CREATE FUNCTION cf_balance_watch() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v_old bigint := OLD.balance_micros - OLD.held_micros;
    v_new bigint := NEW.balance_micros - NEW.held_micros;
    t bigint;
BEGIN
    FOREACH t IN ARRAY NEW.watch_below_micros LOOP
        IF v_old >= t AND v_new < t THEN
            INSERT INTO outbox (account_id, kind, dedup_key, payload)
            VALUES (NEW.account_id, 'balance.below_threshold',
                    'below:' || NEW.account_id || ':' || t || ':' || txid_current(),
                    jsonb_build_object('threshold_micros', t, 'available_micros', v_new,
                                       'balance_micros', NEW.balance_micros))
            ON CONFLICT (dedup_key) DO NOTHING;
        END IF;
    END LOOP;
    RETURN NULL;
END $$;
CREATE TRIGGER balances_watch AFTER UPDATE ON balances FOR EACH ROW
    WHEN (cardinality(NEW.watch_below_micros) > 0
          AND NEW.balance_micros - NEW.held_micros < OLD.balance_micros - OLD.held_micros)
    EXECUTE FUNCTION cf_balance_watch();

-- The watches of one account, from every feature that watches its balance (today: auto-recharge).
CREATE FUNCTION cf_refresh_watch(p_account text) RETURNS bigint[] LANGUAGE sql AS $$
    UPDATE balances SET watch_below_micros = coalesce(
        (SELECT array_agg(DISTINCT s.threshold_micros ORDER BY s.threshold_micros)
           FROM auto_recharge_settings s WHERE s.account_id = p_account AND s.enabled), '{}')
    WHERE account_id = p_account
    RETURNING watch_below_micros;
$$;

-- Recharge charges share the top-up machinery (one row before Stripe is called, the PaymentIntent id
-- recorded, one ledger credit keyed by it); request ids are scoped by kind so a customer's top-up
-- request id can never collide with the workflow's ``recharge-{seq}``.
ALTER TABLE stripe_charges DROP CONSTRAINT stripe_charges_kind_check;
ALTER TABLE stripe_charges ADD CONSTRAINT stripe_charges_kind_check CHECK (kind IN ('topup', 'auto_recharge'));
ALTER TABLE stripe_charges DROP CONSTRAINT stripe_charges_account_id_request_id_key;
ALTER TABLE stripe_charges ADD CONSTRAINT stripe_charges_account_kind_request_key UNIQUE (account_id, kind, request_id);
