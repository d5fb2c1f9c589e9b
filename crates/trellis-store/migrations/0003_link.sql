-- The outpost link: join tokens, what the hub keeps of each outpost's agent,
-- and how far each stage's outpost has come with its desired state.
--
-- Same rules as 0001: portable types, unix milliseconds, JSON as TEXT, no
-- cascading actions (the store deletes these rows with their outpost or
-- stage).

-- Only the hash of a join token is stored, never the token.
CREATE TABLE join_tokens (
    token_hash TEXT   NOT NULL PRIMARY KEY,
    outpost    TEXT   NOT NULL REFERENCES outposts (name),
    expires_at BIGINT NOT NULL,
    -- NULL until the token is used; it works once.
    used_at    BIGINT
);
CREATE INDEX join_tokens_by_outpost ON join_tokens (outpost);

-- At most one row per outpost; none until its agent joined.
CREATE TABLE outpost_links (
    outpost         TEXT NOT NULL PRIMARY KEY REFERENCES outposts (name),
    -- `sha256:<hex>` of the agent's public key.
    key_fingerprint TEXT,
    cert_serial     TEXT,
    cert_not_after  BIGINT,
    -- JSON document: the agent's last hello.
    agent           TEXT,
    last_seen       BIGINT,
    last_disconnect TEXT
);

-- At most one row per stage; none until something was delivered or
-- reported.
CREATE TABLE stage_syncs (
    project            TEXT   NOT NULL,
    stage              TEXT   NOT NULL,
    delivered_revision BIGINT NOT NULL,
    applied_revision   BIGINT NOT NULL,
    -- JSON document: the agent's latest status report for the stage.
    report             TEXT,
    updated_at         BIGINT,
    PRIMARY KEY (project, stage),
    FOREIGN KEY (project, stage) REFERENCES stages (project, name)
);
