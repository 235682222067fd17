-- API tokens: only the SHA-256 of a token is kept; its value is shown once, when it is made.
CREATE TABLE api_tokens (
    id uuid PRIMARY KEY,
    name text NOT NULL,
    hash bytea NOT NULL UNIQUE,
    scopes text[] NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    revoked_at timestamptz
);

-- Every state-changing API request: who, what, when, from where, and the answer's status.
CREATE TABLE audit_log (
    id bigserial PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT now(),
    actor text NOT NULL,
    credential text NOT NULL,
    action text NOT NULL,
    target jsonb NOT NULL DEFAULT '{}',
    peer text,
    status smallint NOT NULL
);
CREATE INDEX audit_log_by_actor ON audit_log (actor, id);
CREATE INDEX audit_log_by_time ON audit_log (at);

-- Append-only: no code path updates or deletes an entry, and the table refuses it anyway
-- (removing the trigger takes a deliberate act of the table's owner).
CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only';
END
$$;
CREATE TRIGGER audit_log_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();
