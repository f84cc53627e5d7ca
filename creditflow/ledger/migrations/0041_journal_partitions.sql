-- The journal partitioned by month, idempotency keys in a table of their own, daily usage rollups (issue 16 §4,
-- docs/partitioning.md).
--
-- The journal (usage items are its ``usage`` rows) grows forever. Partitioned by month of ``created_at``, old
-- months can be detached, dumped and dropped, and what reads an account's recent entries touches recent partitions
-- only. A partitioned table's unique keys must include the partition column, so ``(account_id, idempotency_key)``,
-- which refused a replayed key, cannot stay the journal's key: it moves to ``journal_keys``, one row per journal
-- row, written by a BEFORE INSERT trigger on the journal (so in the same statement, hence the same transaction, as
-- the entry, by every writer: cf_post and friends, and the few inserts made from Python). ``journal_keys`` also
-- names where the row is (``created_at``, ``seq``): a lookup by key reads one partition.
--
-- The trigger needs its function before it can be created, and the migrations run before functions/: so this
-- migration defines cf_journal_key, the same text functions/partitions.sql keeps (FOLDED_MIGRATIONS).

-- 1. Idempotency keys: global, in their own table, backfilled.
CREATE TABLE journal_keys (
    account_id       text NOT NULL,
    idempotency_key  text NOT NULL,
    created_at       timestamptz NOT NULL,  -- the journal row's: its partition
    seq              bigint NOT NULL,       -- the journal row's: with account and created_at, its index entry
    PRIMARY KEY (account_id, idempotency_key)
);
INSERT INTO journal_keys (account_id, idempotency_key, created_at, seq)
    SELECT account_id, idempotency_key, created_at, seq FROM journal;

-- Record a journal row's key (BEFORE INSERT on the journal). A replayed key fails here on journal_keys_pkey with
-- unique_violation, exactly as it failed on the journal's own key before.
CREATE OR REPLACE FUNCTION cf_journal_key() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO journal_keys (account_id, idempotency_key, created_at, seq)
        VALUES (NEW.account_id, NEW.idempotency_key, NEW.created_at, NEW.seq);
    RETURN NEW;
END $$;

-- 2. The journal, partitioned by month (UTC), with a DEFAULT partition so that an insert never fails when a
-- month's partition is missing (cf_ensure_journal_partitions moves such rows out when it creates the month).
DROP VIEW journal_lines;
ALTER TABLE journal RENAME TO journal_unpartitioned;
ALTER INDEX journal_pkey RENAME TO journal_unpartitioned_pkey;
ALTER INDEX journal_account_time RENAME TO journal_unpartitioned_account_time;
ALTER INDEX journal_id RENAME TO journal_unpartitioned_id;
ALTER SEQUENCE journal_seq OWNED BY NONE;

CREATE TABLE journal (LIKE journal_unpartitioned INCLUDING DEFAULTS INCLUDING CONSTRAINTS)
    PARTITION BY RANGE (created_at);

DO $$
DECLARE
    v_month timestamptz := date_trunc('month', coalesce((SELECT min(created_at) FROM journal_unpartitioned), now()),
                                      'UTC');
    v_last timestamptz := date_trunc('month', now(), 'UTC') + interval '3 months';
BEGIN
    WHILE v_month <= v_last LOOP
        EXECUTE format('CREATE TABLE %I PARTITION OF journal FOR VALUES FROM (%L) TO (%L)',
                       'journal_y' || to_char(v_month AT TIME ZONE 'UTC', 'YYYY"m"MM'), v_month,
                       v_month + interval '1 month');
        v_month := v_month + interval '1 month';
    END LOOP;
END $$;
CREATE TABLE journal_default PARTITION OF journal DEFAULT;

CREATE INDEX journal_account_time ON journal (account_id, created_at, seq);
-- Money-movement rows are looked up by transaction id (refunds name the purchase); usage rows are reached through
-- their account. Ids come from gen_random_uuid(); the index is per partition, so no longer UNIQUE.
CREATE INDEX journal_id ON journal (id) WHERE type <> 'usage';

INSERT INTO journal SELECT * FROM journal_unpartitioned;
DROP TABLE journal_unpartitioned;
ALTER SEQUENCE journal_seq OWNED BY journal.seq;

CREATE VIEW journal_lines AS
    SELECT id AS txn_id, 'wallet'::text AS book, account_id, amount_micros FROM journal
    UNION ALL
    SELECT id, counter_book, NULL, -amount_micros FROM journal;

-- Row triggers on a partitioned table reach every partition, present and future.
CREATE TRIGGER journal_key BEFORE INSERT ON journal FOR EACH ROW EXECUTE FUNCTION cf_journal_key();
CREATE TRIGGER journal_append_only BEFORE UPDATE OR DELETE ON journal
    FOR EACH ROW EXECUTE FUNCTION cf_forbid_change();
CREATE TRIGGER journal_no_truncate BEFORE TRUNCATE ON journal
    FOR EACH STATEMENT EXECUTE FUNCTION cf_forbid_change();
CREATE TRIGGER journal_purchase_resumes_agents AFTER INSERT ON journal FOR EACH ROW
    WHEN (NEW.type IN ('purchase', 'auto_recharge') AND NEW.amount_micros > 0)
    EXECUTE FUNCTION cf_purchase_resumes_agents();
CREATE TRIGGER journal_keys_append_only BEFORE UPDATE OR DELETE ON journal_keys
    FOR EACH ROW EXECUTE FUNCTION cf_forbid_change();
CREATE TRIGGER journal_keys_no_truncate BEFORE TRUNCATE ON journal_keys
    FOR EACH STATEMENT EXECUTE FUNCTION cf_forbid_change();

-- As in 0020, for each partition (ANALYZE reads the partitions' own attribute options).
ALTER TABLE journal ALTER COLUMN account_id SET (n_distinct = -0.05);
DO $$
DECLARE
    p regclass;
BEGIN
    FOR p IN SELECT inhrelid::regclass FROM pg_inherits WHERE inhparent = 'journal'::regclass LOOP
        EXECUTE format('ALTER TABLE %s ALTER COLUMN account_id SET (n_distinct = -0.05)', p);
    END LOOP;
END $$;
ANALYZE journal;
ANALYZE journal_keys;

-- 3. Daily usage rollups: one row per UTC day, account, feature, channel and agent ('' for none), for days that
-- are over (cf_rollup_usage, run by the partition maintenance schedule). Reports over closed days read these
-- instead of the journal's old partitions. ``usage_rollup_days`` records which days are materialized.
CREATE TABLE usage_daily (
    day             date NOT NULL,
    account_id      text NOT NULL,
    feature_id      text NOT NULL,  -- '' for usage rows without a feature
    channel         text NOT NULL,
    agent_id        text NOT NULL,  -- '' for none
    events          bigint NOT NULL,
    quantity        numeric NOT NULL,
    charged_micros  bigint NOT NULL,
    PRIMARY KEY (account_id, day, feature_id, channel, agent_id)
);
CREATE INDEX usage_daily_day ON usage_daily (day);
CREATE TABLE usage_rollup_days (
    day        date PRIMARY KEY,
    rows       integer NOT NULL,
    events     bigint NOT NULL,
    rolled_at  timestamptz NOT NULL DEFAULT now()
);
