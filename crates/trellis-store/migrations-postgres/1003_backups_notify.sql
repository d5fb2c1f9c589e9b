-- PostgreSQL only: a backup asked for, or a restore of one, is work for the
-- outpost of its stage; the hub instance holding that outpost's link hears
-- of it as `o:<outpost>` (see 1002) and sends it over the link. Only a new
-- backup or a change of its state or restore notifies: progress does not.
CREATE FUNCTION trellis_notify_backup() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' OR NEW.state <> OLD.state
       OR NEW.restore IS DISTINCT FROM OLD.restore THEN
        PERFORM pg_notify('trellis', 'o:' || s.outpost)
            FROM stages s WHERE s.project = NEW.project AND s.name = NEW.stage;
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER backups_notify AFTER INSERT OR UPDATE ON backups
    FOR EACH ROW EXECUTE FUNCTION trellis_notify_backup();
