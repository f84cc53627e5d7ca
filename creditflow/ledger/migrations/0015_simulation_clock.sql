-- The ledger's clock, injectable for the billing simulator (issue 4): ``cf_now()`` is ``now()`` unless the
-- session sets ``creditflow.now`` (``SET creditflow.now = '2027-03-14T09:00:00Z'``). Only ``creditflow
-- simulate`` sets it, on its own throwaway database, so a replayed usage trace lands in the simulated billing
-- periods (usage items are dated by it, and day/month limits count by it). Production never sets it.
CREATE FUNCTION cf_now() RETURNS timestamptz LANGUAGE sql STABLE AS $$
    SELECT coalesce(nullif(current_setting('creditflow.now', true), '')::timestamptz, now())
$$;
ALTER TABLE journal ALTER COLUMN created_at SET DEFAULT cf_now();
CREATE OR REPLACE FUNCTION cf_utc_today() RETURNS date LANGUAGE sql STABLE AS $$
    SELECT (cf_now() AT TIME ZONE 'UTC')::date
$$;
