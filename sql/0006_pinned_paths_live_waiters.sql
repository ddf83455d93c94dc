-- outbox-relay migration 6: no role borrows the owner's rights through the
-- schema's functions, and applications notify only while a live relay waits.
-- Schema-agnostic like the others (objects unqualified, search_path set by
-- migrate); run it in one transaction, as migrate does.

-- 1. Every function's search_path is "<schema>, pg_temp".
--
-- `SET search_path FROM CURRENT` under a search_path of the schema alone (as
-- migrations 1 to 5 ran) pinned the schema alone, and PostgreSQL then searches
-- the caller's temporary schema *first* for tables and views: backlog(), which
-- runs with its owner's rights (SECURITY DEFINER), read a caller's temporary
-- view named `messages`, and the functions in that view ran as the owner. With
-- pg_temp listed last, the schema's own objects come first. Functions and
-- operators are never looked up in pg_temp, and only the owner can create
-- objects in the schema (`grants` gives USAGE), so every name a body uses
-- resolves to the owner's objects or pg_catalog's.
--
-- The bodies stay unqualified, on purpose: the files serve any schema name,
-- known only when they run, and the pinned path is what makes the names safe.
-- `migrate` now re-creates every function from sql/functions/ after the
-- numbered files with the search_path "<schema>, pg_temp", and
-- sql/checks/functions_pin_search_path.sql stops it if one is left unpinned.

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
-- (sql/functions/relay_set_idle.sql, relay_heartbeat.sql, relay_release.sql,
-- sql/triggers/messages_notify_relay.sql.)
ALTER TABLE relays ADD COLUMN live_until timestamptz;

COMMENT ON SEQUENCE relays_waiting IS
    'Until when some relay waits for a NOTIFY and is alive, in milliseconds since the epoch (0: none); the insert trigger notifies only before then.';

-- The count migration 3 kept means nothing now; relays already running say
-- until when they live at their next heartbeat (within a second).
SELECT pg_advisory_xact_lock(hashtext(current_schema() || '.relays_waiting'));
SELECT setval('relays_waiting', 0, true);
