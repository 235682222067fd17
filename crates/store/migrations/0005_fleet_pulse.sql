-- When any coordinator last processed a worker heartbeat. Leases expire only against this
-- pulse, never against the wall clock alone: while no heartbeat gets through (RabbitMQ away),
-- no lease expires, and after such a gap every lease is extended once, so that workers that
-- held tasks through the outage have a full lease period to report again.
CREATE TABLE fleet_pulse (
    id integer PRIMARY KEY CHECK (id = 1),
    at timestamptz NOT NULL
);
INSERT INTO fleet_pulse (id, at) VALUES (1, now());
