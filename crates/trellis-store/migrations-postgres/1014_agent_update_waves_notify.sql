-- PostgreSQL only: an agent update becomes work for its outpost when it is
-- recorded pending (1006) and when its wave is sent (0014: `waiting` to
-- `pending`); the hub instance holding the outpost's link hears of either
-- as `o:<outpost>`. A trigger on the whole row, as in 1012, so that 1001's
-- trellis_text_in_c can retype the columns.
CREATE OR REPLACE FUNCTION trellis_notify_agent_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (TG_OP = 'INSERT' AND NEW.state = 'pending')
        OR (TG_OP = 'UPDATE' AND OLD.state = 'waiting' AND NEW.state = 'pending') THEN
        PERFORM pg_notify('trellis', 'o:' || NEW.outpost);
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER agent_updates_wave_notify AFTER UPDATE ON agent_updates
    FOR EACH ROW EXECUTE FUNCTION trellis_notify_agent_update();
