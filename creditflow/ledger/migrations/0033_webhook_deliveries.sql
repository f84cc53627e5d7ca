-- Customer-webhook deliveries as the API lists them, and redeliveries (issue 12: GET /api/v1/webhooks/deliveries,
-- POST /api/v1/webhooks/deliveries/{id}/redeliver; docs/api.md).
--
-- response_code: the HTTP status of the channel's last attempt (NULL: no answer, e.g. connection refused or a
-- refused destination; or not an HTTP channel). redelivery_of: a redelivery is a notification of its own (its own
-- dedup key, rows and attempts) that sends the *same event* again: this names the first delivery of that event,
-- whose notification gives the event id, type, created time and data.
-- public_id: the delivery's API id (whd_<hex>), random so that ids say nothing about other accounts' volume.
ALTER TABLE notification_deliveries
    ADD COLUMN response_code integer CHECK (response_code BETWEEN 100 AND 599),
    ADD COLUMN redelivery_of bigint REFERENCES notification_deliveries (id),
    ADD COLUMN public_id uuid NOT NULL DEFAULT gen_random_uuid() UNIQUE;

-- The webhook channel's rows with what the list shows: id is the public id (the list's cursor), row_id the row's;
-- redelivery_of the first delivery's row, first_public_id its public id; event_key the dedup key of the event's
-- first notification (its event id is derived from it), kind its type.
CREATE VIEW webhook_deliveries AS
SELECT d.public_id AS id, d.id AS row_id, d.account_id, d.status, d.destination, d.attempts, d.response_code,
       d.last_error, d.redelivery_of, o.public_id AS first_public_id, d.created_at, d.updated_at, d.sent_at,
       coalesce(o.dedup_key, d.dedup_key) AS event_key,
       coalesce(ol.kind, l.kind) AS kind,
       coalesce(ol.payload, l.payload) AS payload,
       coalesce(ol.created_at, l.created_at) AS event_created_at
FROM notification_deliveries d
JOIN notifications_log l ON l.id = d.notification_id
LEFT JOIN notification_deliveries o ON o.id = d.redelivery_of
LEFT JOIN notifications_log ol ON ol.id = o.notification_id
WHERE d.channel = 'webhook';
