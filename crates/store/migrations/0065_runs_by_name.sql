-- The run listing filtered by definition (the dashboard's, `GET /api/workflows?name=`), newest
-- first, reads one definition's runs instead of scanning every run.
CREATE INDEX runs_by_name ON runs (name, created_at DESC, id DESC);
