-- backlog(): back pressure for applications, the pending count and the age of
-- the oldest pending row that is late.
--
-- The count stops at 1,000,000 so the call stays cheap on a huge backlog. It
-- runs with its owner's rights (SECURITY DEFINER, search_path pinned), so an
-- application role that may call it needs no SELECT on other rows' columns:
-- only id and message_id, for RETURNING. Like the relay's lag metric, it
-- leaves out rows scheduled for later: a row due in an hour is pending, not
-- late (the 10,000 oldest pending rows are searched).
CREATE OR REPLACE FUNCTION backlog(OUT pending bigint, OUT oldest_pending_age interval)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path FROM CURRENT AS $$
    SELECT (SELECT count(*) FROM (SELECT 1 FROM messages
             WHERE {{pending}} LIMIT 1000000) p),
           now() - (SELECT created_at
                      FROM (SELECT id, created_at, available_at, attempts FROM messages
                             WHERE {{pending}}
                             ORDER BY id LIMIT 10000) f
                     WHERE available_at <= now() OR attempts > 0
                     ORDER BY id LIMIT 1)
$$;
