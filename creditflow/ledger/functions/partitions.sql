-- partitions: today's definitions (creditflow/ledger/functions_check.py and docs/development.md, "Database functions"). Edit here; no migration.
-- The journal partitioned by month, its global idempotency keys, daily usage rollups (0041, docs/partitioning.md).

-- Record a journal row's key (BEFORE INSERT on the journal). A replayed key fails here on journal_keys_pkey with
-- unique_violation, exactly as it failed on the journal's own key before.
CREATE OR REPLACE FUNCTION cf_journal_key() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO journal_keys (account_id, idempotency_key, created_at, seq)
        VALUES (NEW.account_id, NEW.idempotency_key, NEW.created_at, NEW.seq);
    RETURN NEW;
END $$;

-- The journal row written under an account's idempotency key (none, or one). The key table says where it is, so
-- the journal is read in one partition (run-time pruning on created_at) through journal_account_time. Inlined by
-- the planner (a single SELECT, STABLE): as cheap as the lookup it replaces on the journal's former primary key.
CREATE OR REPLACE FUNCTION cf_journal_entry(p_account text, p_key text) RETURNS SETOF journal
LANGUAGE sql STABLE AS $$
    SELECT j.* FROM journal_keys k
    JOIN journal j ON j.account_id = k.account_id AND j.created_at = k.created_at AND j.seq = k.seq
    WHERE k.account_id = p_account AND k.idempotency_key = p_key
$$;

-- Create the journal's monthly partitions (UTC) from the month of ``p_at`` to ``p_ahead`` months after it; returns
-- each month's partition and whether it was created now. Idempotent: a month that has its partition is left alone.
-- Rows that fell into the DEFAULT partition because their month had none are moved into the new partition (the
-- default is detached for that, in this transaction, and attached again). A new partition is built standalone and
-- attached, which does not block writers of the other partitions. Concurrent calls serialize on an advisory lock.
CREATE OR REPLACE FUNCTION cf_ensure_journal_partitions(p_ahead integer DEFAULT 3, p_at timestamptz DEFAULT cf_now())
RETURNS TABLE (partition_name text, range_from timestamptz, range_to timestamptz, created boolean, moved_rows bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_month timestamptz := date_trunc('month', p_at, 'UTC');
BEGIN
    IF p_ahead IS NULL OR p_ahead < 0 OR p_ahead > 120 THEN
        RAISE EXCEPTION 'invalid_months_ahead' USING ERRCODE = 'CF400';
    END IF;
    PERFORM pg_advisory_xact_lock(7161987663119729);  -- "cf_part"
    FOR i IN 0 .. p_ahead LOOP
        partition_name := 'journal_y' || to_char(v_month AT TIME ZONE 'UTC', 'YYYY"m"MM');
        range_from := v_month;
        range_to := v_month + interval '1 month';
        created := to_regclass(partition_name) IS NULL;
        moved_rows := 0;
        IF created THEN
            EXECUTE format('CREATE TABLE %I (LIKE journal INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', partition_name);
            EXECUTE format('ALTER TABLE %I ALTER COLUMN account_id SET (n_distinct = -0.05)', partition_name);
            -- The range as a constraint first: ATTACH then skips its validation scan.
            EXECUTE format('ALTER TABLE %I ADD CONSTRAINT %I CHECK (created_at >= %L AND created_at < %L)',
                           partition_name, partition_name || '_range', range_from, range_to);
            IF EXISTS (SELECT 1 FROM journal_default WHERE created_at >= range_from AND created_at < range_to) THEN
                -- Detached, the default loses the journal's cloned triggers: its rows of the month can move (their
                -- keys in journal_keys keep created_at and seq, so they still point at them).
                ALTER TABLE journal DETACH PARTITION journal_default;
                EXECUTE format('INSERT INTO %I SELECT * FROM journal_default WHERE created_at >= %L AND created_at < %L',
                               partition_name, range_from, range_to);
                GET DIAGNOSTICS moved_rows = ROW_COUNT;
                DELETE FROM journal_default WHERE created_at >= range_from AND created_at < range_to;
                EXECUTE format('ALTER TABLE journal ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                               partition_name, range_from, range_to);
                ALTER TABLE journal ATTACH PARTITION journal_default DEFAULT;
            ELSE
                EXECUTE format('ALTER TABLE journal ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                               partition_name, range_from, range_to);
            END IF;
            EXECUTE format('ALTER TABLE %I DROP CONSTRAINT %I', partition_name, partition_name || '_range');
        END IF;
        RETURN NEXT;
        v_month := v_month + interval '1 month';
    END LOOP;
END $$;

-- Materialize the daily usage rollups of the UTC days [p_from, p_to): one pass over those days' partitions,
-- replacing what was there (idempotent, safe to run again). Returns the number of rollup rows written.
CREATE OR REPLACE FUNCTION cf_rollup_usage(p_from date, p_to date) RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    v_rows integer;
BEGIN
    IF p_from IS NULL OR p_to IS NULL OR p_to < p_from OR p_to - p_from > 3660 THEN
        RAISE EXCEPTION 'invalid_day_range' USING ERRCODE = 'CF400';
    END IF;
    DELETE FROM usage_daily WHERE day >= p_from AND day < p_to;
    INSERT INTO usage_daily (day, account_id, feature_id, channel, agent_id, events, quantity, charged_micros)
        SELECT (created_at AT TIME ZONE 'UTC')::date, account_id, coalesce(feature_id, ''), coalesce(channel, ''),
               coalesce(agent_id, ''), count(*), coalesce(sum(quantity), 0), -sum(amount_micros)
        FROM journal
        WHERE type = 'usage' AND created_at >= (p_from::timestamp AT TIME ZONE 'UTC')
          AND created_at < (p_to::timestamp AT TIME ZONE 'UTC')
        GROUP BY 1, 2, 3, 4, 5;
    GET DIAGNOSTICS v_rows = ROW_COUNT;
    INSERT INTO usage_rollup_days (day, rows, events)
        SELECT d::date, (SELECT count(*) FROM usage_daily u WHERE u.day = d::date),
               (SELECT coalesce(sum(events), 0) FROM usage_daily u WHERE u.day = d::date)
        FROM generate_series(p_from::timestamp, p_to::timestamp - interval '1 day', interval '1 day') AS d
    ON CONFLICT (day) DO UPDATE SET rows = excluded.rows, events = excluded.events, rolled_at = now();
    RETURN v_rows;
END $$;
