-- Keep "account + idempotency key" lookups on the journal's primary key whatever the statistics say (issue 2).
--
-- Right after accounts are created in bulk, ANALYZE sees about one journal row per account (the welcome bonus).
-- Generic plans (batches always use one) then cost an account's journal as a single row and may look a key up
-- through journal_account_time, walking a busy account's whole journal: 0.5 ms per event on the benchmark's hot
-- account, until a later ANALYZE. Telling the planner that an account has about twenty rows on average keeps the
-- unique (account_id, idempotency_key) index the obvious choice; per-account listings still use
-- journal_account_time, which is the only index that gives their order.
ALTER TABLE journal ALTER COLUMN account_id SET (n_distinct = -0.05);
ANALYZE journal;
