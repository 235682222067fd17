-- The steps a submission selected (`only`) or left out (`skip`), as {"only": [...], "skip":
-- [...]}; NULL when the run runs its whole definition. The left-out steps are stored skipped
-- as well: this keeps them so through an operator's retry and tells the API what was asked.
ALTER TABLE runs ADD COLUMN subset jsonb;
