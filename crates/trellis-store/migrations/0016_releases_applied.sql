-- A stage's applied release (one, as a rule: applying a release marks the
-- one before it `replaced`), found without reading the stage's every
-- release. The stage summaries behind `list stage`, `status`, the
-- console's lists and the rollout driver look it up for each stage; a
-- stage pushed to daily holds hundreds of releases within a year.
CREATE INDEX releases_applied ON releases (project, stage, number) WHERE state = 'applied';
