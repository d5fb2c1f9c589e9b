-- PostgreSQL only: a changed link profile (0012) is announced as
-- `p:<outpost>` (a trigger on the whole row: a column named in it could
-- not be retyped by 1001's trellis_text_in_c), so the hub instance holding the outpost's link applies the
-- new heartbeat and delivery windows at once.
CREATE FUNCTION trellis_notify_link_profile() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.link_profile IS DISTINCT FROM OLD.link_profile THEN
        PERFORM pg_notify('trellis', 'p:' || NEW.name);
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER outposts_link_profile_notify AFTER UPDATE ON outposts
    FOR EACH ROW EXECUTE FUNCTION trellis_notify_link_profile();
