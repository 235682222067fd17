-- A step's own lease (its heartbeat_timeout) in ms; NULL: the coordinator's default lease.
ALTER TABLE steps ADD COLUMN lease_ms integer;
