-- Fewer index entries per insert (issue 16): `sequence_id` becomes the change's seq, so the
-- primary key orders the ledger and the separate unique index on `seq` goes. `seq` stays, equal
-- to it, for readers of the table. Through negative values: the primary key is checked row by row.
ALTER TABLE ledger ALTER COLUMN sequence_id TYPE BIGINT;
ALTER SEQUENCE ledger_sequence_id_seq AS BIGINT;
UPDATE ledger SET sequence_id = -seq;
UPDATE ledger SET sequence_id = -sequence_id;
DROP INDEX ledger_seq;
