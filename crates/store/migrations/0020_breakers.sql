-- One circuit breaker per agent, shared by every coordinator. `outcomes` is the window of the
-- latest attempt outcomes, oldest first: '1' a failure, '0' a success. `probe_at` is when an open
-- breaker lets its probe through; `probe_*` name the probe in flight while half-open.
CREATE TABLE breakers (
    agent text PRIMARY KEY,
    state text NOT NULL DEFAULT 'closed',
    outcomes text NOT NULL DEFAULT '',
    opened_at timestamptz,
    probe_at timestamptz,
    probe_run uuid,
    probe_idx integer,
    probe_task uuid,
    reset_by text,
    reset_at timestamptz
);

-- The agent whose breaker holds a waiting step (no attempt yet); set only while held, under a
-- partial index, so releasing finds held steps without a scan of history.
ALTER TABLE steps ADD COLUMN held_for text;
CREATE INDEX steps_held ON steps (held_for, run_id, idx) WHERE held_for IS NOT NULL;
