-- Outpost URIs and revocation.
-- The URI's key is derived from a hub secret and this generation; rotating
-- the URI increments it.
ALTER TABLE outposts ADD COLUMN uri_generation BIGINT NOT NULL DEFAULT 1;
-- Unix milliseconds; NULL while the outpost is not revoked.
ALTER TABLE outposts ADD COLUMN revoked_at BIGINT;
