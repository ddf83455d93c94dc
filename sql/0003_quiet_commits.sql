-- outbox-relay migration 3: applications notify only while a relay waits.
--
-- A commit that carries a NOTIFY takes a database-wide lock, so inserting
-- transactions that notify serialize at commit; and a trigger function that
-- runs for every INSERT statement costs the application 15-20% of its commit
-- rate by itself. A busy relay finds new rows by itself (it claims again as
-- soon as its pipeline drains), so only an idle relay needs to be woken.
--
-- Each relay says whether it waits (`relays.idle`, through relay_set_idle());
-- the sequence `relays_waiting` says whether one does, and the trigger's WHEN
-- reads it with a builtin: while no relay waits, no trigger function runs at
-- all (sql/functions/relay_set_idle.sql, sql/triggers/messages_notify_relay.sql).

ALTER TABLE relays ADD COLUMN idle boolean NOT NULL DEFAULT false;

CREATE SEQUENCE relays_waiting MINVALUE 0;
SELECT setval('relays_waiting', 0, true);
-- Reading it reveals only a count; every role that inserts rows must read it.
GRANT SELECT ON SEQUENCE relays_waiting TO PUBLIC;
