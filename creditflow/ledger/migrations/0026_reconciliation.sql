-- Reconciliation with Stripe: one row per run of ReconciliationWorkflow (scheduled daily, or `creditflow reconcile`).
--
-- A run lists Stripe's PaymentIntents, refunds and disputes created in [since, until), re-checks creditflow's own
-- unsettled charges and refunds, repairs what is safely repairable through the same idempotent paths the
-- workflows use, and stores what it found here. The watermark of the next scheduled run is the ``until`` of the
-- last completed one. Written by creditflow/payments/reconcile.py only.
CREATE TABLE reconciliation_runs (
    id             text PRIMARY KEY,          -- the workflow id of the run
    trigger        text NOT NULL CHECK (trigger IN ('schedule', 'manual')),
    since          timestamptz NOT NULL,
    until          timestamptz NOT NULL CHECK (until >= since),
    status         text NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'completed', 'failed')),
    listed         jsonb NOT NULL DEFAULT '{}'::jsonb,   -- objects read from Stripe, by kind
    matched        integer NOT NULL DEFAULT 0,
    repaired       integer NOT NULL DEFAULT 0,
    reported       integer NOT NULL DEFAULT 0,
    differences    jsonb NOT NULL DEFAULT '[]'::jsonb,   -- every repaired or reported difference
    notes          jsonb NOT NULL DEFAULT '[]'::jsonb,   -- what could not be checked, and why
    violations     integer,                             -- `creditflow verify` after the repairs
    started_at     timestamptz NOT NULL DEFAULT now(),
    finished_at    timestamptz
);
CREATE INDEX reconciliation_runs_started ON reconciliation_runs (started_at DESC);
