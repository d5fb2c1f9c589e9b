-- Per-component requests on a stage (`trellis start|stop|restart
-- component`): part of the stage's desired state, so they survive releases.
--
-- Same rules as 0001: portable types, no cascading actions (the store
-- deletes these rows with their stage).

-- One row per component that was ever started, stopped or restarted.
CREATE TABLE component_controls (
    project   TEXT    NOT NULL,
    stage     TEXT    NOT NULL,
    component TEXT    NOT NULL,
    stopped   BOOLEAN NOT NULL,
    -- How many restarts were requested; a change restarts the component.
    restarts  BIGINT  NOT NULL,
    PRIMARY KEY (project, stage, component),
    FOREIGN KEY (project, stage) REFERENCES stages (project, name)
);
