-- A step is found by its run and index (the engine's writes, the attempts' foreign key) through
-- the primary key. `steps_by_step_id` began with `run_id` too but cannot answer `idx`, and a plan
-- made while the table was young could take it: the steps of the run were then read in step-id
-- order up to the one looked up, half of the run on average for every step written (a fan-out
-- of 10,000 steps ran 5 times slower under such plans). With the step id first, only the primary
-- key begins with the run; a step is still found by its run and id (the heartbeats) through
-- this index. (The rebuild holds off writes to `steps` while it runs: on a large table, upgrade
-- when the fleet is quiet.)
DROP INDEX steps_by_step_id;
CREATE UNIQUE INDEX steps_by_step_id ON steps (step_id, run_id);
