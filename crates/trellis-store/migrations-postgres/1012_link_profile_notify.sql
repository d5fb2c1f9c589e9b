-- PostgreSQL only: a changed link profile (0012) is announced as
-- `p:<outpost>`, so the hub instance holding the outpost's link applies the
-- new heartbeat and delivery windows at once.
CREATE FUNCTION trellis_notify_link_profile() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.link_profile IS DISTINCT FROM OLD.link_profile THEN
        PERFORM pg_notify('trellis', 'p:' || NEW.name);
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER outposts_link_profile_notify AFTER UPDATE OF link_profile ON outposts
    FOR EACH ROW EXECUTE FUNCTION trellis_notify_link_profile();
