-- Backups of a stage's storage (`trellis create backup`): the record of
-- each, and the last restore asked of it. The content lives in the hub's
-- chunk store; `manifest` names the chunk listing it.
--
-- Same rules as 0001: portable types (SQLite and PostgreSQL), unix
-- milliseconds, no cascading actions (the store deletes these rows with
-- their stage). The store numbers backups itself (writes are serial).
CREATE TABLE backups (
    id              BIGINT NOT NULL PRIMARY KEY,
    project         TEXT   NOT NULL REFERENCES projects (name),
    stage           TEXT   NOT NULL,
    display_name    TEXT   NOT NULL,
    state           TEXT   NOT NULL,
    message         TEXT   NOT NULL,
    created_ms      BIGINT NOT NULL,
    created_by      TEXT   NOT NULL,
    finished_ms     BIGINT,
    size_bytes      BIGINT NOT NULL,
    uploaded_bytes  BIGINT NOT NULL,
    manifest        TEXT,
    volumes         TEXT   NOT NULL,
    restore         TEXT
);
CREATE INDEX backups_by_stage ON backups (project, stage, id);

-- The last number handed out per kind of record whose rows may be deleted
-- (backups), so a number is never given twice: an outpost still working
-- on a deleted backup must not find its number on a new one.
CREATE TABLE id_counters (
    name TEXT   NOT NULL PRIMARY KEY,
    last BIGINT NOT NULL
);

-- A stage's backup schedule (`trellis update stage --backup-schedule`):
-- a cron expression (UTC), how many scheduled backups to keep, and when
-- the hub last made one (the next is the schedule's first time after it).
CREATE TABLE backup_schedules (
    project  TEXT   NOT NULL REFERENCES projects (name),
    stage    TEXT   NOT NULL,
    schedule TEXT   NOT NULL,
    keep     BIGINT NOT NULL,
    last_ms  BIGINT NOT NULL,
    PRIMARY KEY (project, stage)
);
