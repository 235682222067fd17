-- The registry of workers, written by the heartbeat consumer in batches: a row per worker that
-- registered or heartbeat, deleted when it says goodbye or stays silent past the grace period.
CREATE TABLE workers (
    worker_id text PRIMARY KEY,
    -- JSON arrays of strings, so a batch of workers is one unnest.
    agents jsonb NOT NULL,
    concurrency integer NOT NULL,
    -- From its latest heartbeat; NULL until one came.
    in_flight integer,
    -- From its registration; NULL while the registry knows the worker by its heartbeats only
    -- (its registration was lost).
    actions jsonb,
    sdk text,
    host text,
    pid integer,
    labels jsonb,
    started_at timestamptz,
    last_seen timestamptz NOT NULL
);
CREATE INDEX workers_by_last_seen ON workers (last_seen);

-- A dispatched attempt no worker has started yet (no heartbeat listed it): since when it is
-- queued, and, for steps with a schedule_to_start (start_ms), when it fails for want of a
-- worker. Set only while that holds, under partial indexes, like the other timers.
ALTER TABLE steps ADD COLUMN queued_at timestamptz;
ALTER TABLE steps ADD COLUMN start_ms integer;
ALTER TABLE steps ADD COLUMN start_by timestamptz;
CREATE INDEX steps_queued ON steps (queued_at) INCLUDE (task_id) WHERE queued_at IS NOT NULL;
CREATE INDEX steps_by_start_by ON steps (start_by) WHERE start_by IS NOT NULL;
