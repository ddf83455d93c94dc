-- outbox-relay migration 4: which RabbitMQ node each relay publishes to.
--
-- A relay given several nodes (a cluster) moves between them on connection
-- loss; `outbox-relay status` shows where each one is now (NULL: connected to
-- none). The relay writes it only when it changes.

ALTER TABLE relays ADD COLUMN broker_node text;

CREATE FUNCTION relay_set_broker_node(p_instance text, p_node text) RETURNS void
LANGUAGE sql SET search_path FROM CURRENT AS $$
    INSERT INTO relays (instance, broker_node) VALUES (p_instance, p_node)
        ON CONFLICT (instance) DO UPDATE SET broker_node = EXCLUDED.broker_node;
$$;
