-- Registered definitions that run by themselves. One row per definition name; the coordinator
-- whose timer claims a due row (FOR UPDATE SKIP LOCKED) starts the tick's run, with an
-- idempotency key naming the tick, so each tick starts one run however many coordinators run.
CREATE TABLE schedules (
    name text PRIMARY KEY,
    cron text NOT NULL,
    timezone text NOT NULL,
    missed text NOT NULL,
    overlap text NOT NULL,
    params jsonb NOT NULL,
    next_at timestamptz NOT NULL,
    last_run_id uuid,
    created_at timestamptz NOT NULL
);
CREATE INDEX schedules_by_next ON schedules (next_at);
