-- creditflow ledger: double-entry journal, credit lots, balances, holds, rate card, outbox, API keys.
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

-- One row per account, updated in the same transaction as the journal. Every writer of an
-- account's money locks this row first, which serializes an account while accounts run in parallel.
CREATE TABLE balances (
    account_id      text PRIMARY KEY REFERENCES accounts (id),
    balance_micros  bigint NOT NULL DEFAULT 0,
    held_micros     bigint NOT NULL DEFAULT 0 CHECK (held_micros >= 0),
    floor_micros    bigint NOT NULL DEFAULT 0 CHECK (floor_micros <= 0),
    -- Usage not yet burned from the credit lots. The hot path only adds to it (no lot row write per
    -- event); cf_settle_burns applies it to the lots, in burn order, before anything that reads or
    -- changes lots. Invariant: sum(remaining of the lots) - unburned = max(balance, 0).
    unburned_micros bigint NOT NULL DEFAULT 0 CHECK (unburned_micros >= 0),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    -- The last guard on the floor: zero, or minus the overage credit line.
    CONSTRAINT balance_above_floor CHECK (balance_micros - held_micros >= floor_micros)
) WITH (fillfactor = 70);  -- room for HOT updates: this row changes on every event

-- The journal. Each row is one balanced transaction with two legs: ``amount_micros`` on the
-- account's wallet and ``-amount_micros`` on ``counter_book`` (a system book: usage revenue,
-- promotions, payments clearing, breakage, refunds, adjustments...). Balanced by construction; the
-- view journal_lines shows the legs. Usage rows carry the usage item (feature, channel, quantity,
-- the rate charged, agent). ``idempotency_key`` is the primary key with the account: one effect per key.
CREATE SEQUENCE journal_seq;
CREATE TABLE journal (
    seq                   bigint NOT NULL DEFAULT nextval('journal_seq'),  -- total order, for paging
    id                    uuid NOT NULL DEFAULT gen_random_uuid(),
    account_id            text NOT NULL,
    type                  text NOT NULL,
    amount_micros         bigint NOT NULL,
    counter_book          text NOT NULL CHECK (counter_book LIKE 'system:%'),
    balance_after_micros  bigint NOT NULL,
    description           text NOT NULL DEFAULT '',
    feature_id            text,
    channel               text,
    quantity              numeric,
    credits_per_unit      numeric,
    agent_id              text,
    idempotency_key       text NOT NULL,
    request_hash          bytea,
    metadata              jsonb,
    created_at            timestamptz NOT NULL DEFAULT now(),
    -- Every write carries a key, scoped to the account: the key is the row's identity.
    PRIMARY KEY (account_id, idempotency_key)
);
ALTER SEQUENCE journal_seq OWNED BY journal.seq;
CREATE INDEX journal_account_time ON journal (account_id, created_at, seq);
-- Money-movement rows are looked up by transaction id (refunds name the purchase); usage rows are
-- reached through their account, so the hot path skips a random-uuid index insert.
CREATE UNIQUE INDEX journal_id ON journal (id) WHERE type <> 'usage';

CREATE VIEW journal_lines AS
    SELECT id AS txn_id, 'wallet'::text AS book, account_id, amount_micros FROM journal
    UNION ALL
    SELECT id, counter_book, NULL, -amount_micros FROM journal;

CREATE TABLE credit_lots (
    id                text PRIMARY KEY,
    account_id        text NOT NULL REFERENCES accounts (id),
    source            text NOT NULL,
    priority          integer NOT NULL,
    original_micros   bigint NOT NULL CHECK (original_micros > 0),
    remaining_micros  bigint NOT NULL CHECK (remaining_micros >= 0 AND remaining_micros <= original_micros),
    -- Set once, when the lot is used up. The burn index filters on this flag rather than on
    -- remaining_micros so that the per-event decrement stays a HOT update (no index writes).
    depleted          boolean NOT NULL DEFAULT false,
    expires_at        timestamptz,
    txn_id            uuid NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    CHECK (depleted = (remaining_micros = 0))
) WITH (fillfactor = 70);
CREATE INDEX credit_lots_burn ON credit_lots (account_id, priority, expires_at, created_at, id)
    WHERE NOT depleted;

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

-- Each feature with the rate in force now (own rate + base feature's rate; NULL if either is missing).
CREATE VIEW feature_prices AS
SELECT f.id, f.name, f.channel, f.unit, f.integer_only, f.base_feature_id,
       (SELECT r.credits_per_unit FROM feature_rates r
         WHERE r.feature_id = f.id AND r.effective_at <= now() ORDER BY r.effective_at DESC LIMIT 1)
       + CASE WHEN f.base_feature_id IS NULL THEN 0 ELSE
           (SELECT r.credits_per_unit FROM feature_rates r
             WHERE r.feature_id = f.base_feature_id AND r.effective_at <= now() ORDER BY r.effective_at DESC LIMIT 1)
         END AS credits_per_unit
FROM features f;

CREATE TABLE holds (
    id               text PRIMARY KEY,
    account_id       text NOT NULL REFERENCES accounts (id),
    feature_id       text NOT NULL,
    agent_id         text,
    quantity         numeric NOT NULL,
    amount_micros    bigint NOT NULL CHECK (amount_micros >= 0),
    status           text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'settled', 'released', 'expired')),
    expires_at       timestamptz NOT NULL,
    idempotency_key  text NOT NULL,
    request_hash     bytea NOT NULL,
    settled_txn_id   uuid,
    metadata         jsonb,
    created_at       timestamptz NOT NULL DEFAULT now(),
    closed_at        timestamptz,
    UNIQUE (account_id, idempotency_key)
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
