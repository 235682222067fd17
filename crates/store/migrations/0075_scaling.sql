-- What each agent with a limit (FLOTILLA_AGENT_LIMITS) uses of it, shared by every coordinator:
-- its attempts running, and its token bucket (`tokens` left at `counted_at`; NULL: full). Locked
-- by every engine batch whose runs call the agent, like its breaker, so dispatches and ends are
-- counted one transaction after another. Steps a limit holds carry `held_for` like those a
-- breaker holds.
CREATE TABLE agent_limits (
    agent text PRIMARY KEY,
    running integer NOT NULL DEFAULT 0,
    tokens double precision,
    counted_at timestamptz
);

-- The labels a worker must have to run a step's own attempts (`labels:`), as a JSON object; NULL
-- when it asks for none. Written with the step, read to tell whether a live worker could take
-- its queued attempt.
ALTER TABLE steps ADD COLUMN labels jsonb;

-- A run whose tasks go to the agents' high-priority queues ('high'); NULL for normal ones.
ALTER TABLE runs ADD COLUMN priority text;
