-- The hub's first schema.
--
-- Kept portable to PostgreSQL, which will run the same statements: standard
-- types only, timestamps as BIGINT unix milliseconds, JSON documents as TEXT,
-- composite natural keys instead of generated ids. Foreign keys have no
-- cascading actions: the store deletes dependants itself, in one
-- transaction, after deciding whether the deletion is allowed, and the keys
-- catch any path that forgets to.
--
-- Never edit a migration that has shipped: the checksum of every applied
-- migration is verified on open. Change the schema in a new numbered file.

CREATE TABLE users (
    name       TEXT    NOT NULL PRIMARY KEY,
    admin      BOOLEAN NOT NULL,
    created_at BIGINT  NOT NULL
);

CREATE TABLE access_keys (
    id          TEXT   NOT NULL PRIMARY KEY,
    user_name   TEXT   NOT NULL REFERENCES users (name),
    description TEXT   NOT NULL,
    -- PHC-format hash of the secret; the secret itself is never stored.
    secret_hash TEXT   NOT NULL,
    created_at  BIGINT NOT NULL
);
CREATE INDEX access_keys_by_user ON access_keys (user_name);

CREATE TABLE projects (
    name        TEXT   NOT NULL PRIMARY KEY,
    description TEXT   NOT NULL,
    created_at  BIGINT NOT NULL,
    -- Highest build number ever assigned in the project. Kept here rather
    -- than derived from builds so that numbers of deleted builds are never
    -- handed out again.
    last_build  BIGINT NOT NULL
);

CREATE TABLE members (
    project   TEXT NOT NULL REFERENCES projects (name),
    user_name TEXT NOT NULL REFERENCES users (name),
    role      TEXT NOT NULL,
    PRIMARY KEY (project, user_name)
);

CREATE TABLE outposts (
    name         TEXT   NOT NULL PRIMARY KEY,
    display_name TEXT   NOT NULL,
    description  TEXT   NOT NULL,
    -- JSON object of label name to value.
    labels       TEXT   NOT NULL,
    -- NULL means no limit.
    max_stages   BIGINT,
    created_at   BIGINT NOT NULL
);

CREATE TABLE stages (
    project          TEXT    NOT NULL REFERENCES projects (name),
    name             TEXT    NOT NULL,
    stage_type       TEXT    NOT NULL,
    display_name     TEXT    NOT NULL,
    suspended        BOOLEAN NOT NULL,
    outpost          TEXT    NOT NULL REFERENCES outposts (name),
    desired_revision BIGINT  NOT NULL,
    latest_release   BIGINT,
    created_at       BIGINT  NOT NULL,
    PRIMARY KEY (project, name)
);
CREATE INDEX stages_by_outpost ON stages (outpost);

CREATE TABLE builds (
    project       TEXT   NOT NULL REFERENCES projects (name),
    name          TEXT   NOT NULL,
    number        BIGINT NOT NULL,
    branch        TEXT   NOT NULL,
    commit_id     TEXT   NOT NULL,
    manifest_file TEXT   NOT NULL,
    manifest      TEXT   NOT NULL,
    -- JSON array of build components.
    components    TEXT   NOT NULL,
    created_at    BIGINT NOT NULL,
    created_by    TEXT   NOT NULL,
    PRIMARY KEY (project, name),
    UNIQUE (project, number)
);

CREATE TABLE configs (
    project    TEXT   NOT NULL,
    stage      TEXT   NOT NULL,
    name       TEXT   NOT NULL,
    version    BIGINT NOT NULL,
    -- JSON objects: variable name to value, file name to content.
    env        TEXT   NOT NULL,
    files      TEXT   NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (project, stage, name),
    FOREIGN KEY (project, stage) REFERENCES stages (project, name)
);

CREATE TABLE releases (
    project    TEXT   NOT NULL,
    stage      TEXT   NOT NULL,
    number     BIGINT NOT NULL,
    build      TEXT   NOT NULL,
    -- JSON config snapshot taken at push time, NULL if the release took none.
    config     TEXT,
    revision   BIGINT NOT NULL,
    state      TEXT   NOT NULL,
    created_at BIGINT NOT NULL,
    created_by TEXT   NOT NULL,
    PRIMARY KEY (project, stage, number),
    FOREIGN KEY (project, stage) REFERENCES stages (project, name),
    FOREIGN KEY (project, build) REFERENCES builds (project, name)
);
CREATE INDEX releases_by_build ON releases (project, build);
