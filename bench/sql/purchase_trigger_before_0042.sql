-- The journal trigger migration 0042 dropped, as it was (under another function name): for
-- `python bench/server_cpu.py --patch bench/sql/purchase_trigger_before_0042.sql` (what it cost per tracked event).
CREATE OR REPLACE FUNCTION cf_old_purchase_trigger() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM agents WHERE account_id = NEW.account_id AND status = 'paused'
               AND pause_reason = 'plan_credits_exhausted') THEN
        INSERT INTO outbox (account_id, kind, dedup_key)
        VALUES (NEW.account_id, 'limits.changed', 'limits.changed:' || NEW.account_id || ':purchase:' || NEW.id)
        ON CONFLICT (dedup_key) DO NOTHING;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER journal_purchase_resumes_agents AFTER INSERT ON journal FOR EACH ROW
    WHEN (NEW.type IN ('purchase', 'auto_recharge') AND NEW.amount_micros > 0)
    EXECUTE FUNCTION cf_old_purchase_trigger();
