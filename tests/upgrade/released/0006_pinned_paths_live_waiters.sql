-- outbox-relay migration 6: no role borrows the owner's rights through the
-- schema's functions, and applications notify only while a live relay waits.
-- Schema-agnostic like the others (objects unqualified, search_path set by
-- migrate); run it in one transaction, as migrate does.

-- 1. Every function's search_path is "<schema>, pg_temp".
--
-- `SET search_path FROM CURRENT` (migrations 1 to 5) pinned the schema alone,
-- and PostgreSQL then searches the caller's temporary schema *first* for tables
-- and views: backlog(), which runs with its owner's rights (SECURITY DEFINER),
-- read a caller's temporary view named `messages`, and the functions in that
-- view ran as the owner. With pg_temp listed last, the schema's own objects
-- come first. Functions and operators are never looked up in pg_temp, and only
-- the owner can create objects in the schema (`grants` gives USAGE), so every
-- name a body uses resolves to the owner's objects or pg_catalog's.
--
-- The bodies stay unqualified, on purpose: this file serves any schema name,
-- known only when it runs (qualifying would mean building every function's
-- text with format()), and the pinned path is what makes the names safe. So
-- ALTER FUNCTION is enough where a body does not change. Functions that run as
-- their caller get the same path: they cannot lend rights, but a temporary
-- table an application happens to call `messages` would otherwise take the
-- rows enqueue() writes. Functions added by later migrations must do the same.
SELECT set_config('search_path', format('%I, pg_temp', current_schema()), true);

ALTER FUNCTION backlog() SET search_path FROM CURRENT;
ALTER FUNCTION enqueue(text, text, bytea, jsonb, text, text, timestamptz, text, text)
    SET search_path FROM CURRENT;
ALTER FUNCTION enqueue(text, text, jsonb, jsonb, text, text, timestamptz, text)
    SET search_path FROM CURRENT;
ALTER FUNCTION enqueue(text, text, text, jsonb, text, text, timestamptz, text)
    SET search_path FROM CURRENT;
ALTER FUNCTION notify_relay() SET search_path FROM CURRENT;
ALTER FUNCTION relay_set_broker_node(text, text) SET search_path FROM CURRENT;
-- relay_heartbeat, relay_set_idle and relay_release are replaced below.

-- 2. Applications notify only while a live relay waits.
--
-- Migration 3 kept a count of idle relays: a relay killed while idle (or
-- frozen past its lease) stayed counted until another relay noticed it gone,
-- and every insert meanwhile sent a NOTIFY nobody read and took PostgreSQL's
-- notify lock. Now each relay's row says until when it is alive (`live_until`,
-- its last heartbeat plus the lease ttl: the same test as for its leases), and
-- `relays_waiting` holds until when some idle relay is alive, in milliseconds
-- since the epoch (0: none). The insert trigger's WHEN compares it with the
-- clock, still with builtins only: once the last waiting relay's heartbeats
-- stop, inserts stop notifying within the ttl, without anyone cleaning up; an
-- idle relay's heartbeat (every second) moves the time on.
--
-- Lock order, for every function that writes `relays` or `leases`: the
-- advisory lock first, then rows of `relays`, then rows of `leases`
-- (migration 3's heartbeat took its own row before the advisory lock,
-- relay_set_idle the other way round: two sessions of one relay could
-- deadlock). relay_set_broker_node writes one row of `relays` and waits for
-- nothing else.
ALTER TABLE relays ADD COLUMN live_until timestamptz;

COMMENT ON SEQUENCE relays_waiting IS
    'Until when some relay waits for a NOTIFY and is alive, in milliseconds since the epoch (0: none); the insert trigger notifies only before then.';

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
    PERFORM pg_advisory_xact_lock(hashtext(current_schema() || '.relays_waiting'));
    DELETE FROM relays WHERE instance = p_instance;
    UPDATE leases SET owner = NULL, expires_at = '-infinity' WHERE owner = p_instance;
    PERFORM setval('relays_waiting',
                   coalesce((SELECT floor(date_part('epoch', max(r.live_until)) * 1000)::bigint
                               FROM relays r WHERE r.idle), 0), true);
END $$;

-- The count migration 3 kept means nothing now; relays already running say
-- until when they live at their next heartbeat (within a second).
SELECT pg_advisory_xact_lock(hashtext(current_schema() || '.relays_waiting'));
SELECT setval('relays_waiting', 0, true);

DROP TRIGGER messages_notify_relay ON messages;
CREATE TRIGGER messages_notify_relay
    BEFORE INSERT ON messages
    FOR EACH STATEMENT
    WHEN (pg_sequence_last_value('relays_waiting') > date_part('epoch', now()) * 1000)
    EXECUTE FUNCTION notify_relay();

-- No function of the schema is left without pg_temp last in its path.
DO $$
DECLARE
    v_unpinned text;
BEGIN
    SELECT string_agg(p.oid::regprocedure::text, ', ') INTO v_unpinned
      FROM pg_proc p
     WHERE p.pronamespace = current_schema()::regnamespace
       AND NOT coalesce(p.proconfig @> ARRAY[format('search_path=%I, pg_temp', current_schema())], false);
    IF v_unpinned IS NOT NULL THEN
        RAISE EXCEPTION 'functions without search_path "%, pg_temp": %', current_schema(), v_unpinned;
    END IF;
END $$;

SELECT set_config('search_path', format('%I', current_schema()), true);
