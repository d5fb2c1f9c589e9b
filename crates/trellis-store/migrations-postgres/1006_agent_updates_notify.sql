-- PostgreSQL only: a new agent update is work for its outpost; the hub
-- instance holding that outpost's link hears of it as `o:<outpost>` (see
-- 1002) and sends it over the link. Only a new update notifies: what the
-- agent reports of it comes in over that same link.
CREATE FUNCTION trellis_notify_agent_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('trellis', 'o:' || NEW.outpost);
    RETURN NEW;
END
$$;
CREATE TRIGGER agent_updates_notify AFTER INSERT ON agent_updates
    FOR EACH ROW EXECUTE FUNCTION trellis_notify_agent_update();
