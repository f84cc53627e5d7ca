-- The admin account list (GET /api/v1/accounts) pages newest first by (created_at, id) with keyset cursors
-- (creditflow/ledger/pagination.py): without this index every page sorted the whole accounts table.
CREATE INDEX IF NOT EXISTS accounts_created_at_id ON accounts (created_at, id);
