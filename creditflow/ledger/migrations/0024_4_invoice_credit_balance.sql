-- Issue 11, defect 11 (part): ``credit_carried_forward_cents`` was computed and never applied. An invoice whose lines
-- come to less than zero (e.g. a downgrade's proration credit) adds the difference to the account's money credit
-- balance; the next invoices apply it ("Applied credit balance", the seed's Balance History wording) until it is
-- used up. The balance is the sum over the account's invoices of what they added less what they applied, written
-- with the invoice row itself (creditflow/invoicing/store.py: prepare, under a per-account lock), so it is applied
-- once.
ALTER TABLE invoices
    ADD COLUMN credit_applied_cents bigint NOT NULL DEFAULT 0 CHECK (credit_applied_cents >= 0),
    ADD COLUMN credit_added_cents bigint NOT NULL DEFAULT 0 CHECK (credit_added_cents >= 0);
-- Invoices drafted before this migration carried their credit forward on paper only: it is added now.
UPDATE invoices SET credit_added_cents = greatest(0, -subtotal_cents) WHERE subtotal_cents < 0;
