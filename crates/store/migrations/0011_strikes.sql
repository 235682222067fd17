-- Three-strike escalation: how far each step went (1 its retries, 2 its fallback, 3 escalated)
-- and the attempts made before its current strike began (its retry budget counts from there).
ALTER TABLE steps ADD COLUMN strike smallint NOT NULL DEFAULT 1;
ALTER TABLE steps ADD COLUMN strike_base integer NOT NULL DEFAULT 0;
-- Which strike each attempt belonged to, and the agent it called (a fallback may call another).
ALTER TABLE attempts ADD COLUMN strike smallint NOT NULL DEFAULT 1;
ALTER TABLE attempts ADD COLUMN agent text;
