-- Scopes that separate reading, metering, settings and money (issue 13, item 9; docs/scopes.md).
--
-- Before: account keys carried billing:read and/or billing:write; billing:write could meter (track, holds, events),
-- change settings, charge the saved card (top-ups, auto-recharge, plan changes), manage cards and request refunds.
-- Now billing:write means settings that charge nothing; metering is usage:write and money is payments:write. So
-- that every stored key keeps exactly what it could do, each key holding billing:write also gets billing:read,
-- usage:write and payments:write (what billing:write implied). billing:read keys keep billing:read: it still reads
-- and checks (check and entitled admit billing:read or usage:write). Nobody gets wallet:credit: manual credits
-- were admin-only. Idempotent: array_agg(DISTINCT ...) of the union.
UPDATE api_keys k SET scopes = (
    SELECT array_agg(DISTINCT s ORDER BY s)
    FROM unnest(k.scopes || ARRAY['billing:read', 'usage:write', 'payments:write']) AS s)
WHERE 'billing:write' = ANY (k.scopes);
