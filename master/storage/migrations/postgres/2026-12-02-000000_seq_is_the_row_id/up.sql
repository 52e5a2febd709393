-- Fewer rows and index entries per insert (issue 16):
-- * `sequence_id` becomes the change's seq, so the primary key orders the ledger and the separate
--   unique index on `seq` goes. `seq` stays, equal to it, for readers of the table. Through
--   negative values: the primary key is checked row by row.
-- * a stored policy's row is the change that inserted it: the change log keeps only deletes and
--   the inserts of policies since deleted (moved there by the delete), so an insert writes one
--   row, not the same policy twice. Commits still move the head row (masters lock it).
ALTER TABLE ledger ALTER COLUMN sequence_id TYPE BIGINT;
ALTER SEQUENCE ledger_sequence_id_seq AS BIGINT;
UPDATE ledger SET sequence_id = -seq;
UPDATE ledger SET sequence_id = -sequence_id;
DROP INDEX ledger_seq;
DELETE FROM ledger_changes c USING ledger l WHERE c.op = 'insert' AND c.seq = l.sequence_id;
