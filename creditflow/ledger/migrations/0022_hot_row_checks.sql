-- Cheaper writes of the balances row on the metering hot path (issue 2).
--
-- At the start of every statement that writes a table, PostgreSQL re-reads the table's CHECK constraints and
-- the expressions of its stored generated columns from their stored text (stringToNode), whether or not the
-- statement touches their columns. The balances row carried eleven single-column CHECKs and the generated
-- `controlled` column: profiled in cf_track_group, rebuilding them was about a fifth of a backend's time.
--
-- * Single-column checks become domains. A domain's constraint lives in the type cache and is evaluated only
--   for the columns a statement assigns: the hot UPDATE (balance, unburned, updated_at) checks what it changes,
--   and a limit or a plan column is still checked wherever it is set, as before.
-- * `controlled` becomes a plain column kept by a BEFORE trigger that fires only for statements assigning a
--   column it is computed from (or itself): the hot UPDATE assigns none of them, so it never runs there.
-- * The one multi-column rule, balance_above_floor, stays a table CHECK.
CREATE DOMAIN cf_positive_micros AS bigint CHECK (VALUE > 0);
CREATE DOMAIN cf_nonnegative_micros AS bigint CHECK (VALUE >= 0);
CREATE DOMAIN cf_floor_micros AS bigint CHECK (VALUE <= 0);
CREATE DOMAIN cf_limit_action AS text CHECK (VALUE IN ('pause', 'alert_only'));

-- Columns in a trigger's WHEN clause cannot change type: balances_watch (0007) is dropped and created again as it was.
DROP TRIGGER balances_watch ON balances;
ALTER TABLE balances DROP COLUMN controlled;
ALTER TABLE balances
    DROP CONSTRAINT balances_daily_limit_micros_check,
    DROP CONSTRAINT balances_daily_usage_alert_micros_check,
    DROP CONSTRAINT balances_day_spent_micros_check,
    DROP CONSTRAINT balances_floor_micros_check,
    DROP CONSTRAINT balances_held_micros_check,
    DROP CONSTRAINT balances_limit_action_check,
    DROP CONSTRAINT balances_month_spent_micros_check,
    DROP CONSTRAINT balances_monthly_limit_micros_check,
    DROP CONSTRAINT balances_per_agent_limit_micros_check,
    DROP CONSTRAINT balances_plan_left_micros_check,
    DROP CONSTRAINT balances_unburned_micros_check;
ALTER TABLE balances
    ALTER COLUMN daily_limit_micros TYPE cf_positive_micros,
    ALTER COLUMN monthly_limit_micros TYPE cf_positive_micros,
    ALTER COLUMN per_agent_limit_micros TYPE cf_positive_micros,
    ALTER COLUMN daily_usage_alert_micros TYPE cf_positive_micros,
    ALTER COLUMN day_spent_micros TYPE cf_nonnegative_micros,
    ALTER COLUMN month_spent_micros TYPE cf_nonnegative_micros,
    ALTER COLUMN held_micros TYPE cf_nonnegative_micros,
    ALTER COLUMN plan_left_micros TYPE cf_nonnegative_micros,
    ALTER COLUMN unburned_micros TYPE cf_nonnegative_micros,
    ALTER COLUMN floor_micros TYPE cf_floor_micros,
    ALTER COLUMN limit_action TYPE cf_limit_action;

CREATE TRIGGER balances_watch AFTER UPDATE ON balances FOR EACH ROW
    WHEN (cardinality(NEW.watch_below_micros) > 0
          AND NEW.balance_micros - NEW.held_micros < OLD.balance_micros - OLD.held_micros)
    EXECUTE FUNCTION cf_balance_watch();

-- The same rule as the generated column it replaces (0013).
CREATE FUNCTION cf_balances_controlled() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.controlled := NEW.daily_limit_micros IS NOT NULL OR NEW.monthly_limit_micros IS NOT NULL
        OR NEW.per_agent_limit_micros IS NOT NULL OR NEW.daily_usage_alert_micros IS NOT NULL OR NEW.agent_controls
        OR NEW.plan_id IS NOT NULL OR NEW.plan_left_micros > 0;
    RETURN NEW;
END $$;

ALTER TABLE balances ADD COLUMN controlled boolean NOT NULL DEFAULT false;
CREATE TRIGGER balances_controlled
    BEFORE INSERT OR UPDATE OF daily_limit_micros, monthly_limit_micros, per_agent_limit_micros,
                               daily_usage_alert_micros, agent_controls, plan_id, plan_left_micros, controlled
    ON balances FOR EACH ROW EXECUTE FUNCTION cf_balances_controlled();
UPDATE balances SET controlled = true;  -- assigning it runs the trigger, which sets the real value
