-- The metrics summary reads the attempts that ended over a recent range.
CREATE INDEX attempts_by_finished_at ON attempts (finished_at) WHERE finished_at IS NOT NULL;
