-- Rollouts (`trellis create rollout`): a build pushed to the stages a
-- label selector chose, wave by wave. `record` is the rollout without its
-- stages (what a list reads), `stages` its stages in wave order with where
-- each stands (JSON). `state` repeats the record's, so the rollouts still
-- holding their stages are found without reading every record; `version`
-- lets a save refuse to overwrite a change it did not see.
--
-- Same rules as 0001: portable types, no cascading actions (the store
-- deletes these rows with their project). Ids come from id_counters
-- ('rollouts'), so a number is never given twice.
CREATE TABLE rollouts (
    id      BIGINT NOT NULL PRIMARY KEY,
    project TEXT   NOT NULL REFERENCES projects (name),
    state   TEXT   NOT NULL,
    version BIGINT NOT NULL,
    record  TEXT   NOT NULL,
    stages  TEXT   NOT NULL
);
CREATE INDEX rollouts_by_project ON rollouts (project, state);
