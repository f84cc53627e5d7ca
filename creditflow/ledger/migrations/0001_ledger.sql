-- creditflow ledger: double-entry journal, credit lots, balances, idempotency, usage, holds, outbox.
-- All amounts are BIGINT micro-credits (1 credit = 1,000,000 micros; 1 credit = 1 US cent).

CREATE TABLE accounts (
    id                          text PRIMARY KEY,
    name                        text NOT NULL,
    billing_email               text NOT NULL,
    external_id                 text UNIQUE,
    status                      text NOT NULL DEFAULT 'active',
    overage_credit_line_micros  bigint NOT NULL DEFAULT 0 CHECK (overage_credit_line_micros >= 0),
    created_at                  timestamptz NOT NULL DEFAULT now()
);

-- One row per account, updated in the same transaction as the journal; locked FOR UPDATE by every
-- writer of the account, which serializes an account's writes while accounts run in parallel.
CREATE TABLE balances (
    account_id      text PRIMARY KEY REFERENCES accounts (id),
    balance_micros  bigint NOT NULL DEFAULT 0,
    held_micros     bigint NOT NULL DEFAULT 0 CHECK (held_micros >= 0),
    floor_micros    bigint NOT NULL DEFAULT 0 CHECK (floor_micros <= 0),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    -- The last guard on the floor: zero, or minus the overage credit line.
    CONSTRAINT balance_above_floor CHECK (balance_micros - held_micros >= floor_micros)
);

CREATE TABLE journal_transactions (
    seq                   bigserial UNIQUE,
    id                    text PRIMARY KEY,
    account_id            text,
    type                  text NOT NULL,
    amount_micros         bigint NOT NULL,           -- effect on the customer's wallet
    balance_after_micros  bigint,
    description           text NOT NULL DEFAULT '',
    metadata              jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at            timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX journal_transactions_account ON journal_transactions (account_id, seq DESC);

-- Lines of each transaction. book = 'wallet' (the customer's, account_id set) or 'system:*'.
CREATE TABLE journal_entries (
    id             bigserial PRIMARY KEY,
    txn_id         text NOT NULL REFERENCES journal_transactions (id),
    book           text NOT NULL,
    account_id     text,
    amount_micros  bigint NOT NULL,
    CHECK ((book = 'wallet') = (account_id IS NOT NULL))
);
CREATE INDEX journal_entries_txn ON journal_entries (txn_id);

CREATE TABLE credit_lots (
    id                text PRIMARY KEY,
    account_id        text NOT NULL REFERENCES accounts (id),
    source            text NOT NULL,
    priority          integer NOT NULL,
    original_micros   bigint NOT NULL CHECK (original_micros > 0),
    remaining_micros  bigint NOT NULL CHECK (remaining_micros >= 0 AND remaining_micros <= original_micros),
    expires_at        timestamptz,
    txn_id            text NOT NULL,
    metadata          jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX credit_lots_burn ON credit_lots (account_id, priority, expires_at, created_at)
    WHERE remaining_micros > 0;

CREATE TABLE idempotency_keys (
    account_id    text NOT NULL,
    key           text NOT NULL,
    request_hash  text NOT NULL,
    response      jsonb NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, key)
);

CREATE TABLE features (
    id               text PRIMARY KEY,
    name             text NOT NULL,
    channel          text NOT NULL,
    unit             text NOT NULL,
    integer_only     boolean NOT NULL DEFAULT true,
    -- A feature priced as another one's rate plus its own (e.g. toll-free = voice + 2/min).
    base_feature_id  text REFERENCES features (id),
    created_at       timestamptz NOT NULL DEFAULT now(),
    CHECK (base_feature_id IS DISTINCT FROM id)
);

-- Versioned rate card: the rate in force at t is the latest row with effective_at <= t.
CREATE TABLE feature_rates (
    id                bigserial PRIMARY KEY,
    feature_id        text NOT NULL REFERENCES features (id),
    credits_per_unit  numeric(20, 6) NOT NULL CHECK (credits_per_unit >= 0),
    effective_at      timestamptz NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    UNIQUE (feature_id, effective_at)
);

CREATE TABLE usage_items (
    id                text PRIMARY KEY,
    account_id        text NOT NULL,
    feature_id        text NOT NULL,
    channel           text NOT NULL,
    quantity          numeric NOT NULL,
    credits_per_unit  numeric NOT NULL,
    credits_micros    bigint NOT NULL,
    agent_id          text,
    txn_id            text NOT NULL,
    metadata          jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX usage_items_account_time ON usage_items (account_id, created_at);

CREATE TABLE holds (
    id             text PRIMARY KEY,
    account_id     text NOT NULL REFERENCES accounts (id),
    feature_id     text NOT NULL,
    agent_id       text,
    quantity       numeric NOT NULL,
    amount_micros  bigint NOT NULL CHECK (amount_micros >= 0),
    status         text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'settled', 'released', 'expired')),
    expires_at     timestamptz NOT NULL,
    result         jsonb,
    metadata       jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at     timestamptz NOT NULL DEFAULT now(),
    closed_at      timestamptz
);
CREATE INDEX holds_active ON holds (account_id, expires_at) WHERE status = 'active';

CREATE TABLE outbox (
    id             bigserial PRIMARY KEY,
    account_id     text NOT NULL,
    kind           text NOT NULL,
    dedup_key      text NOT NULL UNIQUE,
    payload        jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at     timestamptz NOT NULL DEFAULT now(),
    dispatched_at  timestamptz,
    attempts       integer NOT NULL DEFAULT 0,
    last_error     text
);
CREATE INDEX outbox_pending ON outbox (id) WHERE dispatched_at IS NULL;

CREATE TABLE api_keys (
    id            text PRIMARY KEY,
    account_id    text REFERENCES accounts (id),   -- NULL: an admin key for platform services
    name          text NOT NULL DEFAULT '',
    prefix        text NOT NULL,
    secret_hash   text NOT NULL UNIQUE,
    scopes        text[] NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    revoked_at    timestamptz
);
