-- Deleting a project or a stage archives it (records, releases, configs and
-- the volumes on its outpost are kept) until it is restored or purged; and
-- projects get a display name, as stages have.
--
-- Portable to PostgreSQL: ADD COLUMN with a constant default, BIGINT unix
-- milliseconds, NULL meaning "not archived".

ALTER TABLE projects ADD COLUMN display_name TEXT NOT NULL DEFAULT '';
UPDATE projects SET display_name = name;
ALTER TABLE projects ADD COLUMN archived_at BIGINT;
ALTER TABLE stages ADD COLUMN archived_at BIGINT;
