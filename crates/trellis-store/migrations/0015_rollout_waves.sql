-- A rollout's stages, one row per wave: a save rewrites only the waves
-- whose stages changed, not every stage of a 10,000-stage rollout to record
-- a 100-stage wave's progress. `rollouts.stages` keeps the stages of
-- rollouts recorded before this table until their next save moves them
-- here; a rollout's stages are those, then these in wave order.
--
-- Same rules as 0001: portable types, no cascading actions (the store
-- deletes these rows with their rollout's project).
CREATE TABLE rollout_waves (
    rollout BIGINT NOT NULL REFERENCES rollouts (id),
    wave    BIGINT NOT NULL,
    stages  TEXT   NOT NULL,
    PRIMARY KEY (rollout, wave)
);
