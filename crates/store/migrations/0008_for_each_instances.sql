-- Instances of a `for_each` step are step rows of their own (idx past the plan's nodes), so an
-- attempt of an instance is fenced, retried, timed out and leased like a step's. They name the
-- node they belong to, the position of their item, and the item.
ALTER TABLE steps ADD COLUMN instance_of integer;
ALTER TABLE steps ADD COLUMN item_index integer;
ALTER TABLE steps ADD COLUMN item jsonb;
