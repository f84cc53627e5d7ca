-- Named credit systems (issue 13 item 7, seed 003): a credit system is a balance of its own, with its own id
-- (``transcription-credits``); each feature draws on exactly one system (default ``credits``: the wallet as it always
-- was). An account's balance in another system lives in a ledger sub-account: a row of ``accounts`` with
-- ``parent_account_id`` (the customer's account) and ``credit_system_id``, id ``<account id>.<system id>``, with its
-- own ``balances`` row, lots, journal and holds. Every ledger function, check and invariant (balanced entries,
-- balance = lots, floor, one effect per key) then holds per system with no change to the hot path's functions.
-- Sub-accounts are never addressed by the API directly (their ids are not ``acc_<32 hex>``); the API routes a
-- feature's usage, holds and checks to its system's sub-account.

CREATE TABLE credit_systems (
    id          text PRIMARY KEY CHECK (id ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    name        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
INSERT INTO credit_systems (id, name) VALUES ('credits', 'Credits');

-- A constant default: no table rewrite. The system a feature draws on is fixed once the feature exists (API
-- processes cache it, so the hot path pays no lookup per event); the trigger is the last guard.
ALTER TABLE features ADD COLUMN credit_system_id text NOT NULL DEFAULT 'credits' REFERENCES credit_systems (id);

CREATE FUNCTION cf_feature_system_fixed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.credit_system_id IS DISTINCT FROM OLD.credit_system_id THEN
        RAISE EXCEPTION 'the credit system of feature % cannot change', OLD.id USING ERRCODE = 'CF409';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER features_credit_system_fixed BEFORE UPDATE OF credit_system_id ON features
    FOR EACH ROW EXECUTE FUNCTION cf_feature_system_fixed();

ALTER TABLE accounts
    ADD COLUMN parent_account_id text REFERENCES accounts (id),
    ADD COLUMN credit_system_id  text REFERENCES credit_systems (id),
    ADD CONSTRAINT accounts_credit_system_pair CHECK ((parent_account_id IS NULL) = (credit_system_id IS NULL)),
    ADD CONSTRAINT accounts_credit_system_not_default CHECK (credit_system_id <> 'credits'),
    ADD CONSTRAINT accounts_credit_system_id CHECK (parent_account_id IS NULL
                                                    OR id = parent_account_id || '.' || credit_system_id);
CREATE UNIQUE INDEX accounts_sub_accounts ON accounts (parent_account_id, credit_system_id)
    WHERE parent_account_id IS NOT NULL;
