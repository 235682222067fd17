-- When a running attempt times out (steps with a `timeout`). Set only while such an attempt
-- runs, so the timer's scan stays small.
ALTER TABLE steps ADD COLUMN deadline timestamptz;
CREATE INDEX steps_by_deadline ON steps (deadline) WHERE deadline IS NOT NULL;
