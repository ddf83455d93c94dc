-- relay_heartbeat(): one call per relay tick (about every second). Registers
-- the relay and until when it is alive, renews its leases, takes free or
-- expired ones up to its fair share, stops renewing the ones above it (they
-- expire and go to a relay with fewer), and says when the next pending row of
-- its partitions that is not due yet becomes due. Returns only leases valid
-- right now. It cannot fail on a row's values. Lock order as in
-- relay_set_idle.sql.
CREATE OR REPLACE FUNCTION relay_heartbeat(p_instance text, p_ttl interval, p_metrics_addr text,
    OUT partitions smallint[], OUT next_due_in double precision)
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_live    int;
    v_total   int;
    v_fair    int;
    v_owned   int;
    v_waiting bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext(current_schema() || '.relays_waiting'));
    INSERT INTO relays (instance, metrics_addr, live_until)
        VALUES (p_instance, p_metrics_addr, now() + p_ttl)
        ON CONFLICT (instance) DO UPDATE
        SET heartbeat_at = now(), metrics_addr = EXCLUDED.metrics_addr,
            live_until = EXCLUDED.live_until;
    DELETE FROM relays WHERE heartbeat_at < now() - 10 * p_ttl;
    -- Until when a live relay waits: moved on by an idle relay's heartbeat,
    -- and a relay gone for good no longer counts. Written only when it changed.
    SELECT coalesce(floor(date_part('epoch', max(r.live_until)) * 1000)::bigint, 0)
      INTO v_waiting FROM relays r WHERE r.idle;
    IF v_waiting IS DISTINCT FROM pg_sequence_last_value('relays_waiting') THEN
        PERFORM setval('relays_waiting', v_waiting, true);
    END IF;

    SELECT count(*) INTO v_live FROM relays WHERE heartbeat_at > now() - p_ttl;
    SELECT count(*) INTO v_total FROM leases;
    v_fair := ceil(v_total::numeric / greatest(v_live, 1));

    -- Keep the lowest-numbered leases up to the fair share; the rest lapse.
    -- `owner = p_instance` again in the UPDATE: a lease taken over between the
    -- subquery and the update is not renewed.
    UPDATE leases l SET expires_at = now() + p_ttl
     WHERE l.owner = p_instance
       AND l.partition IN (SELECT k.partition FROM leases k WHERE k.owner = p_instance
                           ORDER BY k.partition LIMIT v_fair);
    SELECT count(*) INTO v_owned FROM leases k
     WHERE k.owner = p_instance AND k.expires_at > now();
    IF v_owned < v_fair THEN
        UPDATE leases l SET owner = p_instance, expires_at = now() + p_ttl,
                            generation = l.generation + 1
         WHERE l.partition IN (SELECT k.partition FROM leases k
                                WHERE k.owner IS NULL OR k.expires_at < now()
                                ORDER BY k.partition LIMIT v_fair - v_owned
                                FOR UPDATE SKIP LOCKED);
    END IF;

    -- Only leases renewed or taken by this call: the caller's fencing deadline is
    -- the call's start plus ttl, which holds for these and not for lapsing ones.
    SELECT coalesce(array_agg(k.partition ORDER BY k.partition), '{}') INTO partitions
      FROM leases k WHERE k.owner = p_instance AND k.expires_at = now() + p_ttl;
    -- Seconds until the next pending row that is not yet due becomes due, on
    -- the database's clock, clamped: epochs of any finite time, never an
    -- interval overflow. (NULL when none: greatest/least would turn NULL into
    -- a bound.) Only rows due later: the index range starts at now(), past the
    -- dead entries of every row already relayed. Rows due now are the
    -- caller's to find, from its claim floor.
    SELECT CASE WHEN min(m.available_at) IS NOT NULL THEN
                least(greatest(date_part('epoch', min(m.available_at)) - date_part('epoch', now()),
                               -1e9), 1e9) END
      INTO next_due_in FROM messages m
     WHERE {{pending m}} AND m.available_at > now()
       AND m.partition = ANY(partitions);
END $$;
