-- outbox-relay migration 4: which RabbitMQ node each relay publishes to.
--
-- A relay given several nodes (a cluster) moves between them on connection
-- loss; `outbox-relay status` shows where each one is now (NULL: connected to
-- none). The relay writes it, only when it changes, through
-- sql/functions/relay_set_broker_node.sql.

ALTER TABLE relays ADD COLUMN broker_node text;
