-- messages_notify_relay: applications notify only while a live relay waits.
--
-- A commit that carries a NOTIFY takes a database-wide lock, and a trigger
-- function that runs for every INSERT statement costs the application 15-20%
-- of its commit rate by itself. So: one NOTIFY per statement (not per row),
-- and only while `relays_waiting` (until when some idle relay is alive, see
-- relay_set_idle.sql) is in the future; the WHEN reads it with builtins only,
-- so while no relay waits no trigger function runs at all.
-- A trigger has no CREATE OR REPLACE before PostgreSQL 14: dropped and created
-- again, in migrate's transaction.
DROP TRIGGER IF EXISTS messages_notify_relay ON messages;
CREATE TRIGGER messages_notify_relay
    BEFORE INSERT ON messages
    FOR EACH STATEMENT
    WHEN (pg_sequence_last_value('relays_waiting') > date_part('epoch', now()) * 1000)
    EXECUTE FUNCTION notify_relay();
