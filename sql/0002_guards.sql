-- outbox-relay migration 2: no row's values can break the relay's own
-- statements, and lease renewal does nothing but renew leases.
-- Schema-agnostic like 0001 (objects unqualified, search_path set by migrate).

-- Infinite times: `-infinity` made every heartbeat fail ("cannot subtract
-- infinite timestamps") and `infinity` means "never". Rows already written are
-- mended first (never due -> parked with the reason), then INSERTs are refused.
UPDATE messages
   SET dead_lettered_at = now(), available_at = now(),
       last_error = 'available_at was infinity (never due): parked by migration 0002; set a real time and retry it'
 WHERE available_at = 'infinity' AND {{pending}};
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
-- and cannot fail on a row's values: sql/functions/relay_heartbeat.sql, with
-- another signature, so the old one goes.
DROP FUNCTION IF EXISTS relay_heartbeat(text, interval, boolean);
