-- Agent updates in waves (`--waves 1,10%,100%`): the updates asked in one
-- request share `batch`, the id of its first update, so the hub finds a
-- request's updates to judge a wave and send the next. Updates recorded
-- before waves are each their own request.
ALTER TABLE agent_updates ADD COLUMN batch BIGINT NOT NULL DEFAULT 0;
UPDATE agent_updates SET batch = id;
CREATE INDEX agent_updates_by_batch ON agent_updates (batch);
CREATE INDEX agent_updates_by_state ON agent_updates (state, batch);
