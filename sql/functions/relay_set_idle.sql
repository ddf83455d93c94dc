-- relay_set_idle(): a relay says whether it waits for a NOTIFY.
--
-- `relays_waiting` holds until when some idle relay is alive, in milliseconds
-- since the epoch (0: none); the insert trigger's WHEN compares it with the
-- clock. Lock order, for every function that writes `relays` or `leases`: the
-- advisory lock first, then rows of `relays`, then rows of `leases`.
CREATE OR REPLACE FUNCTION relay_set_idle(p_instance text, p_idle boolean) RETURNS void
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext(current_schema() || '.relays_waiting'));
    INSERT INTO relays (instance, idle) VALUES (p_instance, p_idle)
        ON CONFLICT (instance) DO UPDATE SET idle = EXCLUDED.idle;
    PERFORM setval('relays_waiting',
                   coalesce((SELECT floor(date_part('epoch', max(r.live_until)) * 1000)::bigint
                               FROM relays r WHERE r.idle), 0), true);
END $$;
