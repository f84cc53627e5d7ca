-- watch: today's definitions (creditflow/ledger/functions_check.py and docs/development.md, "Database functions"). Edit here; no migration.
CREATE OR REPLACE FUNCTION cf_balance_watch() RETURNS trigger LANGUAGE plpgsql AS $$
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

-- The watches of one account: the enabled auto-recharge threshold and every enabled alert threshold. The
-- balance watch trigger (0007) writes one ``balance.below_threshold`` outbox row per watched threshold and
-- crossing; a threshold shared by auto-recharge and an alert is one row, which the account workflow hands to
-- both.
CREATE OR REPLACE FUNCTION cf_refresh_watch(p_account text) RETURNS bigint[] LANGUAGE sql AS $$
    UPDATE balances SET watch_below_micros = coalesce(
        (SELECT array_agg(DISTINCT w.threshold_micros ORDER BY w.threshold_micros) FROM (
             SELECT s.threshold_micros FROM auto_recharge_settings s WHERE s.account_id = p_account AND s.enabled
             UNION ALL
             SELECT a.threshold_micros FROM balance_alerts a WHERE a.account_id = p_account AND a.enabled) w),
        '{}')
    WHERE account_id = p_account
    RETURNING watch_below_micros;
$$;
