-- outbox-relay migration 3: applications notify only while a relay waits.
--
-- A commit that carries a NOTIFY takes a database-wide lock, so inserting
-- transactions that notify serialize at commit; and a trigger function that
-- runs for every INSERT statement costs the application 15-20% of its commit
-- rate by itself. A busy relay finds new rows by itself (it claims again as
-- soon as its pipeline drains), so only an idle relay needs to be woken.
--
-- Each relay says whether it waits (`relays.idle`, through relay_set_idle());
-- the number of waiting relays is kept in the sequence `relays_waiting`, which
-- the trigger's WHEN reads with a builtin: while no relay waits, no trigger
-- function runs at all.

ALTER TABLE relays ADD COLUMN idle boolean NOT NULL DEFAULT false;

CREATE SEQUENCE relays_waiting MINVALUE 0;
SELECT setval('relays_waiting', 0, true);
-- Reading it reveals only a count; every role that inserts rows must read it.
GRANT SELECT ON SEQUENCE relays_waiting TO PUBLIC;

-- One relay at a time (an advisory lock), so a count never misses another
-- relay's change; setval itself is not transactional and is seen at once.
CREATE FUNCTION relay_set_idle(p_instance text, p_idle boolean) RETURNS void
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext(current_schema() || '.relays_waiting'));
    INSERT INTO relays (instance, idle) VALUES (p_instance, p_idle)
        ON CONFLICT (instance) DO UPDATE SET idle = EXCLUDED.idle;
    PERFORM setval('relays_waiting', (SELECT count(*) FROM relays WHERE idle), true);
END $$;

-- The heartbeat as in migration 2, and a relay gone for good no longer counts
-- as waiting.
CREATE OR REPLACE FUNCTION relay_heartbeat(p_instance text, p_ttl interval, p_metrics_addr text,
    OUT partitions smallint[], OUT next_due_in double precision)
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_live  int;
    v_total int;
    v_fair  int;
    v_owned int;
    v_gone  int;
BEGIN
    INSERT INTO relays (instance, metrics_addr) VALUES (p_instance, p_metrics_addr)
        ON CONFLICT (instance) DO UPDATE
        SET heartbeat_at = now(), metrics_addr = EXCLUDED.metrics_addr;
    -- Relays gone for good; if one was waiting, the count of waiting relays
    -- is made true again (else applications would notify for nobody).
    DELETE FROM relays WHERE heartbeat_at < now() - 10 * p_ttl AND NOT idle;
    DELETE FROM relays WHERE heartbeat_at < now() - 10 * p_ttl AND idle;
    GET DIAGNOSTICS v_gone = ROW_COUNT;
    IF v_gone > 0 THEN
        PERFORM pg_advisory_xact_lock(hashtext(current_schema() || '.relays_waiting'));
        PERFORM setval('relays_waiting', (SELECT count(*) FROM relays WHERE idle), true);
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
    -- Seconds until the next pending row is due, on the database's clock (may be
    -- < 0), clamped: epochs of any finite time, never an interval overflow.
    -- (NULL when nothing is pending: greatest/least would turn NULL into a bound.)
    SELECT CASE WHEN min(m.available_at) IS NOT NULL THEN
                least(greatest(date_part('epoch', min(m.available_at)) - date_part('epoch', now()),
                               -1e9), 1e9) END
      INTO next_due_in FROM messages m
     WHERE m.published_at IS NULL AND m.dead_lettered_at IS NULL AND m.available_at IS NOT NULL
       AND m.partition = ANY(partitions);
END $$;

-- A relay stopping cleanly hands its leases back and no longer waits.
CREATE OR REPLACE FUNCTION relay_release(p_instance text) RETURNS void
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    UPDATE leases SET owner = NULL, expires_at = '-infinity' WHERE owner = p_instance;
    PERFORM pg_advisory_xact_lock(hashtext(current_schema() || '.relays_waiting'));
    DELETE FROM relays WHERE instance = p_instance;
    PERFORM setval('relays_waiting', (SELECT count(*) FROM relays WHERE idle), true);
END $$;

CREATE OR REPLACE FUNCTION notify_relay() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    PERFORM pg_notify(current_schema() || '.messages', '');
    RETURN NULL;
END $$;

DROP TRIGGER messages_notify_relay ON messages;
CREATE TRIGGER messages_notify_relay
    BEFORE INSERT ON messages
    FOR EACH STATEMENT
    WHEN (pg_sequence_last_value('relays_waiting') > 0)
    EXECUTE FUNCTION notify_relay();
