-- outbox-relay migration 3: applications notify only while a relay waits.
--
-- A commit that carries a NOTIFY takes a database-wide lock, so every inserting
-- transaction that notifies serializes with every other one at commit. A busy
-- relay finds new rows by itself (it claims again as soon as its pipeline
-- drains), so only an idle relay needs to be woken: each relay says whether it
-- waits (`relays.idle`), and the trigger notifies only while one does.

ALTER TABLE relays ADD COLUMN idle boolean NOT NULL DEFAULT true;

-- SECURITY DEFINER: the application's role needs no privilege on `relays`.
CREATE OR REPLACE FUNCTION notify_relay() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM relays WHERE idle) THEN
        PERFORM pg_notify(current_schema() || '.messages', '');
    END IF;
    RETURN NULL;
END $$;
