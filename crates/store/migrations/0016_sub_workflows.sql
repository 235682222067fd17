-- A run started by a sub-workflow step names the attempt that started it (whose task id is the
-- run's id) and how deep it nests; its end is reported to that attempt.
ALTER TABLE runs
    ADD COLUMN parent_run_id uuid,
    ADD COLUMN parent_step_id text,
    ADD COLUMN parent_attempt integer,
    ADD COLUMN depth integer NOT NULL DEFAULT 0;

-- The registered definition a sub-workflow step runs (its agent and action are empty).
ALTER TABLE steps ADD COLUMN workflow text;
