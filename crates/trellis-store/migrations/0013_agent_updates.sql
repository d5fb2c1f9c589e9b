-- Agent updates (`trellis update outposts --agent-version V`): one row per
-- outpost asked, `record` the update as JSON (AgentUpdate). `state`
-- repeats the record's, so the open update of an outpost is found without
-- reading every record.
--
-- Same rules as 0001: portable types, no cascading actions (the store
-- deletes these rows with their outpost). Ids come from id_counters
-- ('agent_updates'), so a number is never given twice.
CREATE TABLE agent_updates (
    id      BIGINT NOT NULL PRIMARY KEY,
    outpost TEXT   NOT NULL REFERENCES outposts (name),
    state   TEXT   NOT NULL,
    record  TEXT   NOT NULL
);
CREATE INDEX agent_updates_by_outpost ON agent_updates (outpost, state);
