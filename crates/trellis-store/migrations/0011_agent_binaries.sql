-- Agent binaries the hub holds, one per version and architecture (`PUT
-- /api/v1/agent-binaries/{version}/{arch}`): what installs and updates
-- agents. The bytes are an artifact in the chunk store, named by
-- `manifest` (the digest of its chunk index), so every hub sharing the
-- store and the chunk store serves the same binary. `blake3` and `sha256`
-- are of the whole binary; `uploaded_at` is in milliseconds.
--
-- Same rules as 0001: portable types only.
CREATE TABLE agent_binaries (
    version     TEXT   NOT NULL,
    arch        TEXT   NOT NULL,
    size        BIGINT NOT NULL,
    blake3      TEXT   NOT NULL,
    sha256      TEXT   NOT NULL,
    manifest    TEXT   NOT NULL,
    uploaded_at BIGINT NOT NULL,
    uploaded_by TEXT   NOT NULL,
    PRIMARY KEY (version, arch)
);
