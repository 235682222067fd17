-- Definitions are stored once per distinct content; runs point at the exact content they
-- started with, so registering a new revision never changes a running run.
CREATE TABLE definition_contents (
    hash text PRIMARY KEY,
    body jsonb NOT NULL
);

CREATE TABLE definitions (
    name text NOT NULL,
    revision integer NOT NULL,
    hash text NOT NULL REFERENCES definition_contents (hash),
    version text,
    description text,
    steps integer NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, revision)
);

CREATE TABLE runs (
    id uuid PRIMARY KEY,
    name text NOT NULL,
    definition_hash text NOT NULL REFERENCES definition_contents (hash),
    status text NOT NULL,
    params jsonb NOT NULL,
    -- Bumped by every committed transition of the run: a coordinator's cached state of the run
    -- is valid only while its version matches.
    version bigint NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL,
    ended_at timestamptz
);
CREATE INDEX runs_by_created ON runs (created_at DESC, id DESC);
CREATE INDEX runs_by_status ON runs (status, created_at DESC, id DESC);

CREATE TABLE steps (
    run_id uuid NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    idx integer NOT NULL,
    step_id text NOT NULL,
    agent text NOT NULL,
    action text NOT NULL,
    status text NOT NULL,
    attempt integer NOT NULL,
    task_id uuid,
    wake_at timestamptz,
    started_at timestamptz,
    ended_at timestamptz,
    output jsonb,
    error text,
    PRIMARY KEY (run_id, idx)
);
-- Only steps waiting for a retry carry wake_at, so the timer's scan stays small however much
-- history accumulates.
CREATE INDEX steps_by_wake ON steps (wake_at) WHERE wake_at IS NOT NULL;

-- One row per dispatched attempt: the history behind "completed exactly once".
CREATE TABLE attempts (
    run_id uuid NOT NULL,
    idx integer NOT NULL,
    attempt integer NOT NULL,
    task_id uuid NOT NULL UNIQUE,
    status text NOT NULL,
    dispatched_at timestamptz NOT NULL,
    started_at timestamptz,
    finished_at timestamptz,
    worker text,
    error text,
    PRIMARY KEY (run_id, idx, attempt),
    FOREIGN KEY (run_id, idx) REFERENCES steps (run_id, idx) ON DELETE CASCADE
);

-- Messages committed together with the state change that caused them; the relay deletes a row
-- once the broker has confirmed the message.
CREATE TABLE outbox (
    id uuid PRIMARY KEY,
    routing_key text NOT NULL,
    kind text NOT NULL,
    correlation_id text,
    reply_to text,
    body bytea NOT NULL,
    created_at timestamptz NOT NULL
);
CREATE INDEX outbox_by_created ON outbox (created_at);
