-- The metering hot path without the journal's purchase trigger (issue 16 §2).
--
-- journal_purchase_resumes_agents (0030_1, on the partitioned journal since 0041) fired for purchase and
-- auto-recharge rows only, but PostgreSQL parses a row trigger's WHEN clause again for every statement that inserts
-- into the table, so every tracked event paid for it (about 3.5 % of the server's CPU per event, perf). cf_post, the
-- only writer of those rows, now calls cf_purchase_resumes_agents(account, txn) itself, in the same transaction
-- (functions/spend_control.sql, functions/posting.sql): the same outbox row, the same dedup key.
DROP TRIGGER journal_purchase_resumes_agents ON journal;
DROP FUNCTION cf_purchase_resumes_agents();
