-- Customer portal sessions (issue 14, docs/portal.md). The platform creates one for an account with its admin key;
-- the answer's URL carries a single-use link token valid for minutes; opening it consumes the token and starts a
-- browser session (an HTTP-only cookie) that ends after an idle hour or at Log out. Only SHA-256 hashes of the
-- link token and of the cookie secret are stored: a database read gives no way into a portal. The CSRF token is
-- not a credential on its own (it is useless without the cookie), so it is kept as is, to be put in every form.

CREATE TABLE portal_sessions (
    id               text PRIMARY KEY,
    account_id       text NOT NULL REFERENCES accounts (id),
    return_url       text NOT NULL,
    link_hash        text NOT NULL UNIQUE,
    link_expires_at  timestamptz NOT NULL,
    opened_at        timestamptz,
    cookie_hash      text UNIQUE,
    csrf_token       text,
    idle_expires_at  timestamptz,
    ended_at         timestamptz,
    created_by       text NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    CHECK ((opened_at IS NULL) = (cookie_hash IS NULL))
);

CREATE INDEX portal_sessions_account ON portal_sessions (account_id, created_at);
