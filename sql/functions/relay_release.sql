-- relay_release(): a relay stopping cleanly hands its leases back at once
-- (instead of letting them lapse) and no longer waits. Lock order as in
-- relay_set_idle.sql.
CREATE OR REPLACE FUNCTION relay_release(p_instance text) RETURNS void
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext(current_schema() || '.relays_waiting'));
    DELETE FROM relays WHERE instance = p_instance;
    UPDATE leases SET owner = NULL, expires_at = '-infinity' WHERE owner = p_instance;
    PERFORM setval('relays_waiting',
                   coalesce((SELECT floor(date_part('epoch', max(r.live_until)) * 1000)::bigint
                               FROM relays r WHERE r.idle), 0), true);
END $$;
