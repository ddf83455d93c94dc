-- outbox-relay migration 1: the outbox table, its indexes, the wake-up trigger,
-- the application helpers and the partition leases.
--
-- Schema-agnostic on purpose: objects are created unqualified in the first schema
-- of search_path, and every function pins that search_path (SET search_path FROM
-- CURRENT), so the same file serves any schema name. `outbox-relay migrate` sets
-- search_path for you; with another migration tool, run first:
--   CREATE SCHEMA IF NOT EXISTS outbox; SET search_path TO outbox;
-- (`outbox-relay migrate --dry-run` prints exactly that, for your schema).

CREATE TABLE messages (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id       uuid        NOT NULL DEFAULT gen_random_uuid() UNIQUE,
    exchange         text        NOT NULL DEFAULT '',
    routing_key      text        NOT NULL DEFAULT '',
    partition_key    text,
    payload          bytea       NOT NULL,
    content_type     text,
    message_type     text,
    correlation_id   text,
    headers          jsonb       NOT NULL DEFAULT '{}',
    created_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    available_at     timestamptz NOT NULL DEFAULT now(),
    attempts         int         NOT NULL DEFAULT 0,
    last_error       text,
    published_at     timestamptz,
    dead_lettered_at timestamptz,
    -- Which lease covers the row (see `leases`): rows of one partition_key share
    -- a partition; rows without one are spread by their message_id.
    partition        smallint    NOT NULL GENERATED ALWAYS AS
                       ((hashtext(coalesce(partition_key, message_id::text)) & 2147483647) % 32) STORED
);

-- A queue table: every row is updated once (marked) and soon deleted
-- (retention). Autovacuum's default waits for 20% of the table to be dead;
-- here it runs every 20,000 changed rows, so freed space is reused before the
-- table grows, and statistics follow the backlog as it swings.
ALTER TABLE messages SET (
    autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 20000,
    autovacuum_vacuum_insert_scale_factor = 0, autovacuum_vacuum_insert_threshold = 20000,
    autovacuum_analyze_scale_factor = 0, autovacuum_analyze_threshold = 20000,
    autovacuum_vacuum_cost_delay = 0);

-- The hot path: pending rows in id order. Partial, so it stays as small as the
-- backlog however many published rows are kept.
CREATE INDEX messages_pending ON messages (id)
    WHERE published_at IS NULL AND dead_lettered_at IS NULL;
-- Rows waiting for a future available_at (scheduled or backing off): finds the
-- next due time, and the partition keys that must wait for them.
-- `available_at IS NOT NULL` (always true) keeps the planner from scanning this
-- index for statements that do not ask about available_at: with statistics
-- taken while few rows were pending, it picked it for the claim's per-key
-- probe and a claim took seconds. Statements that use it say so.
CREATE INDEX messages_pending_due ON messages (available_at)
    WHERE published_at IS NULL AND dead_lettered_at IS NULL AND available_at IS NOT NULL;
-- Per partition key: is there a pending row of this key the relay does not
-- hold below its claim cursor? (keeps per-key order with pipelined claims)
CREATE INDEX messages_pending_key ON messages (partition_key, id)
    WHERE published_at IS NULL AND dead_lettered_at IS NULL AND partition_key IS NOT NULL;
-- Retention deletes published rows oldest first.
CREATE INDEX messages_published ON messages (published_at)
    WHERE published_at IS NOT NULL;
CREATE INDEX messages_dead_lettered ON messages (id)
    WHERE dead_lettered_at IS NOT NULL;

-- One NOTIFY per inserting statement, not per row: a commit carrying NOTIFY takes
-- a database-wide lock, so fewer of them keep concurrent writers fast.
CREATE FUNCTION notify_relay() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    PERFORM pg_notify(current_schema() || '.messages', '');
    RETURN NULL;
END $$;

CREATE TRIGGER messages_notify_relay
    AFTER INSERT ON messages
    FOR EACH STATEMENT EXECUTE FUNCTION notify_relay();

-- Application helpers: call inside your own transaction.
CREATE FUNCTION enqueue(
    exchange text, routing_key text, payload bytea,
    headers jsonb DEFAULT '{}', partition_key text DEFAULT NULL,
    message_type text DEFAULT NULL, available_at timestamptz DEFAULT now(),
    content_type text DEFAULT 'application/octet-stream', correlation_id text DEFAULT NULL
) RETURNS uuid
LANGUAGE sql SET search_path FROM CURRENT AS $$
    INSERT INTO messages (exchange, routing_key, payload, headers, partition_key,
                          message_type, available_at, content_type, correlation_id)
    VALUES (exchange, routing_key, payload, coalesce(headers, '{}'), partition_key,
            message_type, coalesce(available_at, now()), content_type, correlation_id)
    RETURNING message_id
$$;

CREATE FUNCTION enqueue(
    exchange text, routing_key text, payload jsonb,
    headers jsonb DEFAULT '{}', partition_key text DEFAULT NULL,
    message_type text DEFAULT NULL, available_at timestamptz DEFAULT now(),
    correlation_id text DEFAULT NULL
) RETURNS uuid
LANGUAGE sql SET search_path FROM CURRENT AS $$
    SELECT enqueue(exchange, routing_key, convert_to(payload::text, 'UTF8'), headers,
                   partition_key, message_type, available_at, 'application/json', correlation_id)
$$;

CREATE FUNCTION enqueue(
    exchange text, routing_key text, payload text,
    headers jsonb DEFAULT '{}', partition_key text DEFAULT NULL,
    message_type text DEFAULT NULL, available_at timestamptz DEFAULT now(),
    correlation_id text DEFAULT NULL
) RETURNS uuid
LANGUAGE sql SET search_path FROM CURRENT AS $$
    SELECT enqueue(exchange, routing_key, convert_to(payload, 'UTF8'), headers,
                   partition_key, message_type, available_at, 'text/plain; charset=utf-8', correlation_id)
$$;

-- Back pressure for applications: pending count and age of the oldest pending
-- row. The count stops at 1,000,000 so the call stays cheap on a huge backlog.
CREATE FUNCTION backlog(OUT pending bigint, OUT oldest_pending_age interval)
LANGUAGE sql STABLE SET search_path FROM CURRENT AS $$
    SELECT (SELECT count(*) FROM (SELECT 1 FROM messages
             WHERE published_at IS NULL AND dead_lettered_at IS NULL LIMIT 1000000) p),
           now() - (SELECT created_at FROM messages
                    WHERE published_at IS NULL AND dead_lettered_at IS NULL
                    ORDER BY id LIMIT 1)
$$;

-- Partition leases: each partition has at most one relay publishing it. A relay
-- renews its leases every second; a lease not renewed within its ttl is free.
CREATE TABLE relays (
    instance     text PRIMARY KEY,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE leases (
    partition  smallint PRIMARY KEY,
    owner      text,
    expires_at timestamptz NOT NULL DEFAULT '-infinity',
    -- Bumped at every change of owner: a fencing token for the new holder.
    generation bigint NOT NULL DEFAULT 0
);
INSERT INTO leases (partition) SELECT generate_series(0, 31);

-- One call per relay tick (about every second): registers the relay, renews its
-- leases, takes free or expired ones up to its fair share, stops renewing the
-- ones above it (they expire and go to a relay with fewer), and reports what the
-- relay needs to decide whether to claim. Returns only leases valid right now.
CREATE FUNCTION relay_heartbeat(p_instance text, p_ttl interval, p_with_stats boolean,
    OUT partitions smallint[], OUT next_due_in double precision, OUT pending bigint,
    OUT oldest_pending_created_at timestamptz, OUT dead_lettered bigint)
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_live  int;
    v_total int;
    v_fair  int;
    v_owned int;
BEGIN
    INSERT INTO relays (instance) VALUES (p_instance)
        ON CONFLICT (instance) DO UPDATE SET heartbeat_at = now();
    DELETE FROM relays WHERE heartbeat_at < now() - 10 * p_ttl;
    SELECT count(*) INTO v_live FROM relays WHERE heartbeat_at > now() - p_ttl;
    SELECT count(*) INTO v_total FROM leases;
    v_fair := ceil(v_total::numeric / greatest(v_live, 1));

    -- Keep the lowest-numbered leases up to the fair share; the rest lapse.
    UPDATE leases l SET expires_at = now() + p_ttl
     WHERE l.partition IN (SELECT k.partition FROM leases k WHERE k.owner = p_instance
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
    -- Seconds until the next pending row is due, on the database's clock (may be < 0).
    SELECT extract(epoch FROM min(m.available_at) - now()) INTO next_due_in FROM messages m
     WHERE m.published_at IS NULL AND m.dead_lettered_at IS NULL AND m.available_at IS NOT NULL
       AND m.partition = ANY(partitions);
    IF p_with_stats THEN
        SELECT count(*), min(m.created_at) INTO pending, oldest_pending_created_at
          FROM messages m WHERE m.published_at IS NULL AND m.dead_lettered_at IS NULL;
        SELECT count(*) INTO dead_lettered FROM messages m WHERE m.dead_lettered_at IS NOT NULL;
    END IF;
END $$;

-- A relay stopping cleanly hands its leases back at once instead of letting them lapse.
CREATE FUNCTION relay_release(p_instance text) RETURNS void
LANGUAGE sql SET search_path FROM CURRENT AS $$
    UPDATE leases SET owner = NULL, expires_at = '-infinity' WHERE owner = p_instance;
    DELETE FROM relays WHERE instance = p_instance;
$$;
