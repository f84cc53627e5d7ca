-- Low-balance alerts (issue 5): per-account thresholds of available balance, each with its channels.
--
-- balance_alerts: written by the API (PUT/POST /api/v1/billing/alerts, creditflow/ledger/alerts.py), which
-- replaces an account's whole list in one transaction under the balances row lock. ``threshold_micros`` is
-- micro-credits of *available* balance (balance - held), like auto-recharge's threshold. A disabled alert is
-- kept (the customer may turn it back on) but not watched. The daily-usage notification threshold lives on
-- the balances row (``daily_usage_alert_micros``, migration 0009), next to the counters it is compared with.
CREATE TABLE balance_alerts (
    account_id        text NOT NULL REFERENCES accounts (id),
    threshold_micros  bigint NOT NULL CHECK (threshold_micros > 0),
    channels          text[] NOT NULL
                      CHECK (cardinality(channels) > 0 AND channels <@ ARRAY['email', 'slack', 'sms', 'webhook']),
    enabled           boolean NOT NULL DEFAULT true,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, threshold_micros)
);

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
