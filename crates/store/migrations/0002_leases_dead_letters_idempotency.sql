-- Step ids are unique within a run; heartbeats and results name steps by id.
CREATE UNIQUE INDEX steps_by_step_id ON steps (run_id, step_id);

-- A running attempt's lease, renewed by the heartbeats of the worker that holds it. Set only
-- while a worker holds the attempt, so the expiry scan stays small.
ALTER TABLE steps ADD COLUMN lease_until timestamptz;
CREATE INDEX steps_by_lease ON steps (lease_until) WHERE lease_until IS NOT NULL;

-- Tasks RabbitMQ dead-lettered (too many deliveries, or rejected by a worker), kept for
-- operators to inspect and redrive.
CREATE TABLE dead_letters (
    id uuid PRIMARY KEY,
    run_id uuid,
    step_id text,
    attempt integer,
    task_id uuid,
    reason text NOT NULL,
    deliveries bigint,
    body bytea NOT NULL,
    created_at timestamptz NOT NULL,
    redriven_at timestamptz
);
CREATE INDEX dead_letters_by_created ON dead_letters (created_at DESC);

-- Idempotency-Key of a submission → the run it started, kept for a retention period.
CREATE TABLE idempotency_keys (
    key text PRIMARY KEY,
    run_id uuid NOT NULL,
    created_at timestamptz NOT NULL
);
CREATE INDEX idempotency_keys_by_created ON idempotency_keys (created_at);
