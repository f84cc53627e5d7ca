-- Spend management on/off (seed 002's toggle, issue 14). While it is off, the account's limits (daily, monthly,
-- per-agent default) are kept here, {"daily_limit_micros": ..., "monthly_limit_micros": ...,
-- "per_agent_limit_micros": ...}, and the live columns are NULL, so the metering gate (cf_spend_gate, unchanged)
-- enforces none of them; turning it on moves them back (creditflow/ledger/limits.py). NULL: on.
ALTER TABLE balances ADD COLUMN spend_limits_off jsonb;
