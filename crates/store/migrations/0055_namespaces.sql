-- Tenants: runs, named definitions, schedules and API tokens belong to a namespace. Everything
-- stored before namespaces existed belongs to `default`.
ALTER TABLE runs ADD COLUMN namespace text NOT NULL DEFAULT 'default';
CREATE INDEX runs_by_namespace ON runs (namespace, created_at DESC, id DESC);
-- The runs in flight of a namespace, counted at every submission to a namespace with a quota
-- (a sub-workflow's run counts as part of its parent's).
CREATE INDEX runs_in_flight ON runs (namespace) WHERE ended_at IS NULL AND parent_run_id IS NULL;

-- A definition's name is unique within its namespace.
ALTER TABLE definitions ADD COLUMN namespace text NOT NULL DEFAULT 'default';
ALTER TABLE definitions DROP CONSTRAINT definitions_pkey;
ALTER TABLE definitions ADD PRIMARY KEY (namespace, name, revision);

ALTER TABLE schedules ADD COLUMN namespace text NOT NULL DEFAULT 'default';
ALTER TABLE schedules DROP CONSTRAINT schedules_pkey;
ALTER TABLE schedules ADD PRIMARY KEY (namespace, name);

-- The namespaces a token may see; `*` stands for all of them. Admin tokens administered the
-- whole fleet before namespaces existed, and keep doing so.
ALTER TABLE api_tokens ADD COLUMN namespaces text[] NOT NULL DEFAULT '{default}';
UPDATE api_tokens SET namespaces = '{*}' WHERE 'admin' = ANY (scopes);
