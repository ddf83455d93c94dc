-- Applied last: no function of the schema is left without pg_temp last in its
-- search_path (see the README's "Least privilege"). A function a file forgets
-- to pin, or one an older version left behind, stops migrate here.
DO $$
DECLARE
    v_unpinned text;
BEGIN
    SELECT string_agg(p.oid::regprocedure::text, ', ') INTO v_unpinned
      FROM pg_proc p
     WHERE p.pronamespace = current_schema()::regnamespace
       AND NOT coalesce(p.proconfig @> ARRAY[format('search_path=%I, pg_temp', current_schema())], false);
    IF v_unpinned IS NOT NULL THEN
        RAISE EXCEPTION 'functions without search_path "%, pg_temp": %', current_schema(), v_unpinned;
    END IF;
END $$;
