-- Issue 11, defect 5: a new run of the account workflow rebuilds its dedup window from the outbox.
--
-- dispatched_run_id: the account workflow run that accepted the row's signal (signal-with-start returns it). A new
-- run (terminated, reset, started again) treats rows delivered to OTHER runs as already seen, while rows delivered
-- to itself (the event that started it, rows relayed while it was loading) are still applied. NULL: delivered
-- before this column existed (to an earlier run).
ALTER TABLE outbox ADD COLUMN dispatched_run_id text;

-- An account's rows in order: the rebuilt dedup window (its last delivered rows) and the relay's per-account order.
CREATE INDEX outbox_account ON outbox (account_id, id);
