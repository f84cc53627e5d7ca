-- core: today's definitions (creditflow/ledger/functions_check.py and docs/development.md, "Database functions"). Edit here; no migration.
-- The journal is append-only: mistakes are corrected by reversing entries.
CREATE OR REPLACE FUNCTION cf_forbid_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only', TG_TABLE_NAME USING ERRCODE = 'CF500';
END $$;

CREATE OR REPLACE FUNCTION cf_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('creditflow_outbox', NEW.account_id);
    RETURN NULL;
END $$;

-- The ledger's clock, injectable for the billing simulator (issue 4): ``cf_now()`` is ``now()`` unless the
-- session sets ``creditflow.now`` (``SET creditflow.now = '2027-03-14T09:00:00Z'``). Only ``creditflow
-- simulate`` sets it, on its own throwaway database, so a replayed usage trace lands in the simulated billing
-- periods (usage items are dated by it, and day/month limits count by it). Production never sets it.
CREATE OR REPLACE FUNCTION cf_now() RETURNS timestamptz LANGUAGE sql STABLE AS $$
    SELECT coalesce(nullif(current_setting('creditflow.now', true), '')::timestamptz, now())
$$;

CREATE OR REPLACE FUNCTION cf_utc_today() RETURNS date LANGUAGE sql STABLE AS $$
    SELECT (cf_now() AT TIME ZONE 'UTC')::date
$$;
