-- PostgreSQL only: text compares byte by byte, as in SQLite.
--
-- The shared migrations (`../migrations/`) declare plain TEXT, which
-- PostgreSQL compares by the database's collation: under a locale such as
-- en_US.UTF-8, `line-10` sorts before `line1` and lists would come back in
-- another order than from the SQLite store (and from `trellis hub migrate`'s
-- copy of it). The store calls this function after every migration, so the
-- columns of tables added later are brought to "C" too; it changes only
-- columns that are not "C" yet and returns how many it changed.
--
-- Versions 1001 and up are PostgreSQL's own; they never collide with the
-- shared migrations' numbers (each migrator ignores the other's).
CREATE FUNCTION trellis_text_in_c() RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    c record;
    changed integer := 0;
BEGIN
    FOR c IN
        SELECT cols.table_name, cols.column_name
        FROM information_schema.columns cols
        JOIN information_schema.tables t
            ON t.table_schema = cols.table_schema AND t.table_name = cols.table_name
        WHERE cols.table_schema = current_schema()
            AND t.table_type = 'BASE TABLE'
            AND cols.data_type = 'text'
            AND cols.table_name NOT LIKE '\_sqlx%'
            AND COALESCE(cols.collation_name, '') <> 'C'
    LOOP
        EXECUTE format('ALTER TABLE %I ALTER COLUMN %I TYPE text COLLATE "C"',
                       c.table_name, c.column_name);
        changed := changed + 1;
    END LOOP;
    RETURN changed;
END
$$;
