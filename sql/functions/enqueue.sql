-- enqueue(): the application helpers, to call inside your own transaction.
-- Three overloads by payload type; the jsonb and text ones call the bytea one,
-- which is therefore defined first.
CREATE OR REPLACE FUNCTION enqueue(
    exchange text, routing_key text, payload bytea,
    headers jsonb DEFAULT '{}', partition_key text DEFAULT NULL,
    message_type text DEFAULT NULL, available_at timestamptz DEFAULT now(),
    content_type text DEFAULT 'application/octet-stream', correlation_id text DEFAULT NULL
) RETURNS uuid
LANGUAGE sql SET search_path FROM CURRENT AS $$
    INSERT INTO messages (exchange, routing_key, payload, headers, partition_key,
                          message_type, available_at, content_type, correlation_id)
    VALUES (exchange, routing_key, payload, coalesce(headers, '{}'), partition_key,
            message_type, coalesce(available_at, now()), content_type, correlation_id)
    RETURNING message_id
$$;

CREATE OR REPLACE FUNCTION enqueue(
    exchange text, routing_key text, payload jsonb,
    headers jsonb DEFAULT '{}', partition_key text DEFAULT NULL,
    message_type text DEFAULT NULL, available_at timestamptz DEFAULT now(),
    correlation_id text DEFAULT NULL
) RETURNS uuid
LANGUAGE sql SET search_path FROM CURRENT AS $$
    SELECT enqueue(exchange, routing_key, convert_to(payload::text, 'UTF8'), headers,
                   partition_key, message_type, available_at, 'application/json', correlation_id)
$$;

CREATE OR REPLACE FUNCTION enqueue(
    exchange text, routing_key text, payload text,
    headers jsonb DEFAULT '{}', partition_key text DEFAULT NULL,
    message_type text DEFAULT NULL, available_at timestamptz DEFAULT now(),
    correlation_id text DEFAULT NULL
) RETURNS uuid
LANGUAGE sql SET search_path FROM CURRENT AS $$
    SELECT enqueue(exchange, routing_key, convert_to(payload, 'UTF8'), headers,
                   partition_key, message_type, available_at, 'text/plain; charset=utf-8', correlation_id)
$$;
