-- notify_relay(): the insert trigger's function (sql/triggers/messages_notify_relay.sql),
-- one NOTIFY per inserting statement. Granted to no role: PostgreSQL runs a
-- trigger without checking EXECUTE.
CREATE OR REPLACE FUNCTION notify_relay() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    PERFORM pg_notify(current_schema() || '.messages', '');
    RETURN NULL;
END $$;
