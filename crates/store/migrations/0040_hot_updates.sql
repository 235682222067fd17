-- Steps and runs are updated several times each (a step at dispatch and at its end, a run at
-- every batch that touches it). Room left in each page lets the new version of a row stay on
-- its page, so updates that change no indexed column are HOT: no index entry written, and the
-- dead versions are pruned without VACUUM. Applies to pages filled from now on.
ALTER TABLE steps SET (fillfactor = 70);
ALTER TABLE runs SET (fillfactor = 70);
