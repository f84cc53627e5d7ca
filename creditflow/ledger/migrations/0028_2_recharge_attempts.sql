-- Every auto-recharge outcome the account workflow judged, kept (the settings row mirrors only the last one).
--
-- The outcome names the charge it succeeded with, so ``creditflow verify`` can see a success that is not a charge of
-- its own (a new run that reused an old sequence number and took the old charge's success for its own: nothing
-- charged, nothing credited) and operators can read a recharge's history. One row per attempt: a retried
-- activity writes the same (account, seq, attempted_at) again.
CREATE TABLE auto_recharge_attempts (
    account_id   text NOT NULL REFERENCES accounts (id),
    seq          integer NOT NULL,
    attempted_at timestamptz NOT NULL,
    generation   integer NOT NULL,
    status       text NOT NULL,
    charge_id    text,
    error        text,
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, seq, attempted_at)
);
CREATE INDEX auto_recharge_attempts_charge ON auto_recharge_attempts (charge_id) WHERE charge_id IS NOT NULL;
