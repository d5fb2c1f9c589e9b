-- A stage's applied release (one, as a rule: applying a release marks the
-- one before it `replaced`), found without reading the stage's every
-- release. The stage summaries behind `list stage`, `status`, the
-- console's lists and the rollout driver look it up for each stage; a
-- stage pushed to daily holds hundreds of releases within a year.
CREATE INDEX releases_applied ON releases (project, stage, number) WHERE state = 'applied';
-- Likewise a stage's pending releases (pushed, not yet running), which a
-- status report moves to `superseded` once a newer one runs: the group
-- commit of reports finds them here, not among every release of the stage.
CREATE INDEX releases_pending ON releases (project, stage, number) WHERE state = 'pending';
