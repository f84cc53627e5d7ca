-- The coalescer's groups in one call (issue 2): cf_track for each event, in the order given, in the caller's
-- transaction. Unlike cf_track_batch this is not set-based: every event moves its account's balance on its own,
-- so the balance watch (auto-recharge, alerts) sees each event's balance exactly as for single calls. What it
-- saves is per-event overhead: one statement, one round trip and one commit for the whole group, and on the
-- client one set of array parameters instead of one execute per event.
--
-- Callers pass the events sorted by account (stable: arrival order within an account), so concurrent groups lock
-- balances rows in one order and cannot deadlock. p_probe as in cf_track.
CREATE FUNCTION cf_track_group(
    p_accounts text[], p_features text[], p_quantities numeric[], p_agents text[], p_keys text[],
    p_hashes bytea[], p_metadata jsonb[], p_probe boolean DEFAULT true
) RETURNS SETOF cf_track_result LANGUAGE plpgsql AS $$
BEGIN
    FOR i IN 1 .. coalesce(array_length(p_accounts, 1), 0) LOOP
        RETURN NEXT cf_track(p_accounts[i], p_features[i], p_quantities[i], p_agents[i], p_keys[i],
                             p_hashes[i], p_metadata[i], p_probe);
    END LOOP;
END $$;
