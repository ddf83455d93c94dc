-- outbox-relay migration 1: the outbox table, its indexes and the partition
-- leases. (The wake-up trigger, the application helpers and the lease
-- functions live in sql/functions/ and sql/triggers/, applied after the
-- numbered files.)
--
-- Schema-agnostic on purpose: objects are created unqualified in the first schema
-- of search_path, so the same file serves any schema name. `{{pending}}` is the
-- one spelling of "a row still to publish" (see src/store/predicates.rs),
-- filled in when the file is applied. With another migration tool, apply what
-- `outbox-relay migrate --dry-run --schema NAME` prints: search_path set, the
-- placeholders filled in, and the functions and trigger after the numbered files.

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
    WHERE {{pending}};
-- Rows waiting for a future available_at (scheduled or backing off): finds the
-- next due time, and the partition keys that must wait for them.
-- `available_at IS NOT NULL` (always true) keeps the planner from scanning this
-- index for statements that do not ask about available_at: with statistics
-- taken while few rows were pending, it picked it for the claim's per-key
-- probe and a claim took seconds. Statements that use it say so.
CREATE INDEX messages_pending_due ON messages (available_at)
    WHERE {{pending}} AND available_at IS NOT NULL;
-- Per partition key: is there a pending row of this key the relay does not
-- hold below its claim cursor? (keeps per-key order with pipelined claims)
CREATE INDEX messages_pending_key ON messages (partition_key, id)
    WHERE {{pending}} AND partition_key IS NOT NULL;
-- Retention deletes published rows oldest first.
CREATE INDEX messages_published ON messages (published_at)
    WHERE published_at IS NOT NULL;
CREATE INDEX messages_dead_lettered ON messages (id)
    WHERE dead_lettered_at IS NOT NULL;

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
