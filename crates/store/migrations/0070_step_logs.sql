-- What the handlers of a run's steps wrote to their logs. One row per run that has a log,
-- locked by every write of its lines: so the lines of a run are numbered (`seq`) in the order
-- their writes commit, and a reader asking for the lines after the last it saw misses none.
CREATE TABLE step_log_runs (
    run_id uuid PRIMARY KEY REFERENCES runs (id) ON DELETE CASCADE,
    lines bigint NOT NULL DEFAULT 0
);

-- How much of each attempt's log is stored, for its cap; once `truncated`, nothing more is.
CREATE TABLE step_log_attempts (
    run_id uuid NOT NULL REFERENCES step_log_runs (run_id) ON DELETE CASCADE,
    step_id text NOT NULL,
    attempt integer NOT NULL,
    bytes bigint NOT NULL DEFAULT 0,
    truncated boolean NOT NULL DEFAULT false,
    PRIMARY KEY (run_id, step_id, attempt)
);

-- A line is stored once per (execution, line number) its worker gave it, however often its
-- batch is delivered; `seq` is its place in the run's log.
CREATE TABLE step_logs (
    run_id uuid NOT NULL REFERENCES step_log_runs (run_id) ON DELETE CASCADE,
    seq bigint NOT NULL,
    step_id text NOT NULL,
    attempt integer NOT NULL,
    execution_id uuid NOT NULL,
    line_no bigint NOT NULL,
    stream text NOT NULL,
    line text NOT NULL,
    at timestamptz NOT NULL,
    PRIMARY KEY (run_id, seq),
    UNIQUE (run_id, step_id, attempt, execution_id, line_no)
);
