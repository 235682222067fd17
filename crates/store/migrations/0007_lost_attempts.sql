-- Attempts of a step lost to the infrastructure (lease expired, task dead-lettered); they do not
-- use up the step's retry budget.
ALTER TABLE steps ADD COLUMN lost integer NOT NULL DEFAULT 0;
