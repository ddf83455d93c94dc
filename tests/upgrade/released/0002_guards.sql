-- outbox-relay migration 2: no row's values can break the relay's own
-- statements, and lease renewal does nothing but renew leases.
-- Schema-agnostic like 0001 (objects unqualified, search_path set by migrate).

-- Infinite times: `-infinity` made every heartbeat fail ("cannot subtract
-- infinite timestamps") and `infinity` means "never". Rows already written are
-- mended first (never due -> parked with the reason), then INSERTs are refused.
UPDATE messages
   SET dead_lettered_at = now(), available_at = now(),
       last_error = 'available_at was infinity (never due): parked by migration 0002; set a real time and retry it'
 WHERE available_at = 'infinity' AND published_at IS NULL AND dead_lettered_at IS NULL;
UPDATE messages SET available_at = now() WHERE NOT isfinite(available_at);
UPDATE messages SET created_at = now() WHERE NOT isfinite(created_at);
-- NOT VALID then VALIDATE: the check of existing rows does not block inserts.
ALTER TABLE messages ADD CONSTRAINT messages_times_are_finite
    CHECK (isfinite(created_at) AND isfinite(available_at)) NOT VALID;
ALTER TABLE messages VALIDATE CONSTRAINT messages_times_are_finite;

-- Where each relay serves /metrics (what it bound, e.g. with port 0), for `status`.
ALTER TABLE relays ADD COLUMN metrics_addr text;

-- The heartbeat no longer computes backlog statistics (they run on the relay's
-- housekeeping connection, capped), renews only leases this relay still owns,
-- and cannot fail on a row's values.
DROP FUNCTION relay_heartbeat(text, interval, boolean);

CREATE FUNCTION relay_heartbeat(p_instance text, p_ttl interval, p_metrics_addr text,
    OUT partitions smallint[], OUT next_due_in double precision)
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_live  int;
    v_total int;
    v_fair  int;
    v_owned int;
BEGIN
    INSERT INTO relays (instance, metrics_addr) VALUES (p_instance, p_metrics_addr)
        ON CONFLICT (instance) DO UPDATE
        SET heartbeat_at = now(), metrics_addr = EXCLUDED.metrics_addr;
    DELETE FROM relays WHERE heartbeat_at < now() - 10 * p_ttl;
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
