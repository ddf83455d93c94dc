-- relay_set_broker_node(): which RabbitMQ node a relay publishes to (NULL:
-- connected to none), for `outbox-relay status`. The relay calls it only when
-- the node changes. It writes one row of `relays` and waits for nothing else.
CREATE OR REPLACE FUNCTION relay_set_broker_node(p_instance text, p_node text) RETURNS void
LANGUAGE sql SET search_path FROM CURRENT AS $$
    INSERT INTO relays (instance, broker_node) VALUES (p_instance, p_node)
        ON CONFLICT (instance) DO UPDATE SET broker_node = EXCLUDED.broker_node;
$$;
