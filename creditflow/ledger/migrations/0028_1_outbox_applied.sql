-- A row's effect is done: applied_at. Delivered is not applied.
--
-- The account workflow accepts an outbox row's signal (dispatched_at, dispatched_run_id) and applies some kinds
-- later, in its main loop (payment events, alerts, limits). A run terminated in between never applies them; the
-- next run rebuilds its dedup window from rows delivered to other runs, and re-applies the ones of those kinds that
-- are still not applied (their effects are idempotent by key: a Stripe refund or dispute id, a notification key).
--
-- Existing rows count as applied (they were delivered before this column existed; a non-volatile default fills them
-- without rewriting the table), except rows not yet delivered.
ALTER TABLE outbox ADD COLUMN applied_at timestamptz DEFAULT now();
ALTER TABLE outbox ALTER COLUMN applied_at DROP DEFAULT;
UPDATE outbox SET applied_at = NULL WHERE dispatched_at IS NULL;
