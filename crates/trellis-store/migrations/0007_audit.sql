-- Streams opened into stages (exec, port forwarding, console terminals):
-- who, when, into what, how it went. Kept with the project.
CREATE TABLE audit_log (
    id INTEGER PRIMARY KEY,
    time_ms BIGINT NOT NULL,
    user_name TEXT NOT NULL,
    project TEXT NOT NULL REFERENCES projects(name) ON DELETE CASCADE,
    stage TEXT NOT NULL,
    component TEXT NOT NULL,
    outpost TEXT NOT NULL,
    action TEXT NOT NULL,
    detail TEXT NOT NULL,
    result TEXT NOT NULL
);
CREATE INDEX audit_log_project ON audit_log (project, id);
