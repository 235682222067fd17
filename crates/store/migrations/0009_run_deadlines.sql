-- When a run with a workflow `timeout` times out; set only while its steps may still run, so
-- the timer's scan stays small. `error` says why a run failed when no step's failure does.
ALTER TABLE runs ADD COLUMN deadline timestamptz;
ALTER TABLE runs ADD COLUMN error text;
CREATE INDEX runs_by_deadline ON runs (deadline) WHERE deadline IS NOT NULL;
