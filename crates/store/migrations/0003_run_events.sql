-- What operators did to a run, and who: the run's history of interventions.
CREATE TABLE run_events (
    id bigserial PRIMARY KEY,
    run_id uuid NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    at timestamptz NOT NULL,
    actor text NOT NULL,
    action text NOT NULL,
    step_id text,
    detail jsonb
);
CREATE INDEX run_events_by_run ON run_events (run_id, id);
