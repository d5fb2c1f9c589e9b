-- PostgreSQL only: what the hubs sharing this database know of each other
-- (see crates/trellis-store/src/cluster.rs).

-- Every running hub process ("instance") beats its row.
CREATE TABLE hub_instances (
    id         TEXT   NOT NULL PRIMARY KEY,
    -- host:port at which the other instances reach it.
    address    TEXT   NOT NULL,
    version    TEXT   NOT NULL,
    started_at BIGINT NOT NULL,
    beat_at    BIGINT NOT NULL
);

-- Which instance holds each outpost's link. A link-up takes the next epoch;
-- the instance holding an older one ends its session (fencing).
CREATE TABLE link_claims (
    outpost     TEXT   NOT NULL PRIMARY KEY REFERENCES outposts (name) ON DELETE CASCADE,
    instance    TEXT   NOT NULL,
    epoch       BIGINT NOT NULL,
    since       BIGINT NOT NULL,
    -- NULL while the session runs.
    released_at BIGINT
);
CREATE INDEX link_claims_by_instance ON link_claims (instance);

-- What every instance must agree on: the CA and the URI secret, sealed
-- with the cluster key (the hub seals and opens them; this table only
-- holds the text).
CREATE TABLE hub_secrets (
    name  TEXT NOT NULL PRIMARY KEY,
    value TEXT NOT NULL
);

-- Notifications on channel `trellis`, sent when the transaction commits
-- (payloads as `Change::parse` reads them):
--   o:<outpost>                    a stage on it changed what should run, or left it
--   r:<outpost>                    it was revoked or deleted
--   c:<epoch>:<instance>:<outpost> its link was claimed
-- Identical notifications of one transaction are sent once.

CREATE FUNCTION trellis_notify_stage() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('trellis', 'o:' || OLD.outpost);
        RETURN OLD;
    END IF;
    IF NEW.desired_revision <> OLD.desired_revision OR NEW.outpost <> OLD.outpost THEN
        PERFORM pg_notify('trellis', 'o:' || NEW.outpost);
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER stages_notify AFTER UPDATE OR DELETE ON stages
    FOR EACH ROW EXECUTE FUNCTION trellis_notify_stage();

CREATE FUNCTION trellis_notify_outpost() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('trellis', 'r:' || OLD.name);
        RETURN OLD;
    END IF;
    IF NEW.revoked_at IS NOT NULL AND OLD.revoked_at IS NULL THEN
        PERFORM pg_notify('trellis', 'r:' || NEW.name);
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER outposts_notify AFTER UPDATE OR DELETE ON outposts
    FOR EACH ROW EXECUTE FUNCTION trellis_notify_outpost();

CREATE FUNCTION trellis_notify_claim() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' OR NEW.epoch <> OLD.epoch THEN
        PERFORM pg_notify('trellis',
            'c:' || NEW.epoch || ':' || NEW.instance || ':' || NEW.outpost);
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER link_claims_notify AFTER INSERT OR UPDATE ON link_claims
    FOR EACH ROW EXECUTE FUNCTION trellis_notify_claim();
