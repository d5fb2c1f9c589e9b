-- Streams opened into stages (exec, port forwarding, console terminals):
-- who, when, into what, how it went. Kept with the project.
--
-- Same rules as 0001: portable types (SQLite and PostgreSQL), unix
-- milliseconds, no cascading actions (the store deletes these rows with
-- their project). The store numbers entries itself (writes are serial), so
-- no dialect's auto-increment is needed.
CREATE TABLE audit_log (
    id        BIGINT NOT NULL PRIMARY KEY,
    time_ms   BIGINT NOT NULL,
    user_name TEXT   NOT NULL,
    project   TEXT   NOT NULL REFERENCES projects (name),
    stage     TEXT   NOT NULL,
    component TEXT   NOT NULL,
    outpost   TEXT   NOT NULL,
    action    TEXT   NOT NULL,
    detail    TEXT   NOT NULL,
    result    TEXT   NOT NULL
);
CREATE INDEX audit_log_by_project ON audit_log (project, id);
