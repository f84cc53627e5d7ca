-- A refund Stripe answers ``pending`` stays pending (issue 11, defect 9): it was marked succeeded at once and a later
-- ``refund.failed`` / ``charge.refund.updated`` was ignored, so the customer got neither money nor credits back.
--
-- refunds.status gains ``pending``: Stripe accepted the refund and has not settled it. The credits stay reserved
-- (journal ``refund``); Stripe's final word, from a signed webhook event (charge.refund.updated, refund.updated,
-- refund.failed) or from RefundWorkflow polling the refund, finalizes it (``succeeded``) or releases the reserved
-- credits back to the purchase's lot once (``refund_reversal``, key sys:refund_release:{refund_id}; ``failed``).
ALTER TABLE refunds DROP CONSTRAINT refunds_status_check;
ALTER TABLE refunds ADD CONSTRAINT refunds_status_check
    CHECK (status IN ('reserved', 'refunding', 'pending', 'succeeded', 'failed'));
