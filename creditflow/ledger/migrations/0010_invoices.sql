-- Invoices (issue 4, invoices slice): the billing profile (invoice address, tax registrations), the invoices
-- themselves, and invoice charges in the top-up charge machinery.
--
-- billing_profiles: at most one row per account, written by the API (creditflow/invoicing/profile.py). No row
-- means an empty address. The billing email stays on ``accounts.billing_email`` (the notification service reads
-- it there). ``country`` is an ISO 3166-1 alpha-2 code (checked against the official list in the code).
CREATE TABLE billing_profiles (
    account_id     text PRIMARY KEY REFERENCES accounts (id),
    company        text NOT NULL DEFAULT '',
    address_line1  text NOT NULL DEFAULT '',
    address_line2  text NOT NULL DEFAULT '',
    city           text NOT NULL DEFAULT '',
    postal_code    text NOT NULL DEFAULT '',
    region         text NOT NULL DEFAULT '',
    country        text CHECK (country ~ '^[A-Z]{2}$'),
    po_number      text NOT NULL DEFAULT '',
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);

-- tax_registrations: the customer's tax ids, printed on every invoice as they stand when it is drafted.
-- ``status`` is set by an operator (admin key); a customer adds them as ``unverified``. The same value
-- cannot be registered twice for one country on one account.
CREATE TABLE tax_registrations (
    id           text PRIMARY KEY CHECK (id ~ '^txr_[0-9a-f]{32}$'),
    account_id   text NOT NULL REFERENCES accounts (id),
    country      text NOT NULL CHECK (country ~ '^[A-Z]{2}$'),
    description  text NOT NULL CHECK (length(description) BETWEEN 1 AND 100),
    value        text NOT NULL CHECK (length(value) BETWEEN 1 AND 100),
    status       text NOT NULL DEFAULT 'unverified' CHECK (status IN ('verified', 'unverified')),
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (account_id, country, value)
);
CREATE INDEX tax_registrations_account ON tax_registrations (account_id, created_at);

-- invoices: one per account and billing period (``period_key`` is the period's UTC start date), written by
-- the InvoiceWorkflow's activities (creditflow/invoicing/store.py). The unique (account_id, period_key) is what
-- makes a retried activity or a second run of the workflow return the stored invoice instead of a second one.
-- ``draft`` holds the drafted invoice (lines, totals, bill-to, usage) as JSON with exact decimal strings; html and
-- pdf are rendered once, from that draft, before the row is written, and never change afterwards.
-- Status: draft -> open -> paid | past_due -> paid; void is for operators. ``amount_due_cents`` is what is
-- charged; ``overage_micros`` the credit-line draw this invoice bills (restored to the wallet when paid, journal
-- ``overage_repayment`` keyed ``sys:invoice:{id}``). ``charge_id`` is the stripe_charges row that paid it.
CREATE TABLE invoices (
    id                  text PRIMARY KEY CHECK (id ~ '^inv_[0-9a-f]{32}$'),
    account_id          text NOT NULL REFERENCES accounts (id),
    number              text NOT NULL UNIQUE,
    period_key          text NOT NULL,
    period_start        timestamptz NOT NULL,
    period_end          timestamptz NOT NULL,
    status              text NOT NULL DEFAULT 'draft'
                        CHECK (status IN ('draft', 'open', 'paid', 'past_due', 'void')),
    currency            text NOT NULL DEFAULT 'USD' CHECK (currency = 'USD'),
    subtotal_cents      bigint NOT NULL,
    amount_due_cents    bigint NOT NULL CHECK (amount_due_cents >= 0),
    overage_micros      bigint NOT NULL DEFAULT 0 CHECK (overage_micros >= 0),
    plan_id             text,
    draft               jsonb NOT NULL,
    html                text NOT NULL,
    pdf                 bytea NOT NULL,
    issued_at           timestamptz NOT NULL,
    due_at              timestamptz NOT NULL,
    paid_at             timestamptz,
    charge_id           text REFERENCES stripe_charges (id),
    payment_intent_id   text,
    repayment_txn_id    text,
    attempts            integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    last_error          text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    UNIQUE (account_id, period_key),
    CHECK (period_start < period_end),
    CHECK (due_at >= issued_at),
    CONSTRAINT paid_has_time CHECK (status <> 'paid' OR paid_at IS NOT NULL),
    CONSTRAINT charged_when_due CHECK (status <> 'paid' OR amount_due_cents = 0 OR charge_id IS NOT NULL)
);
CREATE INDEX invoices_account_issued ON invoices (account_id, issued_at DESC, id);

-- Invoice charges share the top-up machinery (the row written before Stripe is called, the PaymentIntent id
-- recorded, retries retrieving it). Their request id is the invoice id (then ``{invoice id}:{attempt}`` for
-- retries), scoped by kind. They buy no credits: ``credits`` is 0 and a succeeded invoice charge has a ledger
-- transaction only when the invoice billed overage (the repayment of the credit line).
ALTER TABLE stripe_charges DROP CONSTRAINT stripe_charges_kind_check;
ALTER TABLE stripe_charges ADD CONSTRAINT stripe_charges_kind_check
    CHECK (kind IN ('topup', 'auto_recharge', 'invoice'));
ALTER TABLE stripe_charges DROP CONSTRAINT stripe_charges_credits_check;
ALTER TABLE stripe_charges ADD CONSTRAINT stripe_charges_credits_check
    CHECK (credits > 0 OR (kind = 'invoice' AND credits = 0));
ALTER TABLE stripe_charges DROP CONSTRAINT succeeded_has_credit;
ALTER TABLE stripe_charges ADD CONSTRAINT succeeded_has_credit
    CHECK (status <> 'succeeded' OR (payment_intent_id IS NOT NULL AND (ledger_txn_id IS NOT NULL OR kind = 'invoice')));
