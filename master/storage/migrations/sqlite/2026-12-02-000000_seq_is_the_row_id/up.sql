-- Fewer pages per insert (issue 16). Every page an insert touches is one more WAL frame written
-- and synced, so:
-- * `sequence_id` becomes the change's seq: the row id itself orders the ledger and the separate
--   unique index on `seq` goes (one index fewer to update). `seq` stays, equal to it, for readers
--   of the table.
-- * no AUTOINCREMENT: it updated `sqlite_sequence` on every insert; seqs come from the head.
-- * a stored policy's row is the change that inserted it: the change log keeps only deletes and
--   the inserts of policies since deleted (moved there by the delete), so an insert writes one
--   row, not the same policy twice.
-- * the change log's `seq` becomes its row id: `BIGINT PRIMARY KEY` was a second b-tree.
CREATE TABLE ledger_next (
    sequence_id INTEGER PRIMARY KEY,
    policy_type VARCHAR NOT NULL,
    policy_id VARCHAR NOT NULL,
    company_name VARCHAR,
    date TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    host VARCHAR NOT NULL,
    status VARCHAR,
    policy VARCHAR,
    seq BIGINT NOT NULL
);
INSERT INTO ledger_next (sequence_id, policy_type, policy_id, company_name, date, host, status, policy, seq)
    SELECT seq, policy_type, policy_id, company_name, date, host, status, policy, seq FROM ledger ORDER BY seq;
DROP TABLE ledger;
ALTER TABLE ledger_next RENAME TO ledger;
CREATE UNIQUE INDEX ledger_policy_id ON ledger (policy_id);
CREATE INDEX ledger_date ON ledger (date);

CREATE TABLE ledger_changes_next (
    seq INTEGER PRIMARY KEY,
    op VARCHAR NOT NULL,
    policy_id VARCHAR NOT NULL,
    policy_type VARCHAR NOT NULL,
    policy VARCHAR
);
INSERT INTO ledger_changes_next (seq, op, policy_id, policy_type, policy)
    SELECT seq, op, policy_id, policy_type, policy FROM ledger_changes ORDER BY seq;
DROP TABLE ledger_changes;
ALTER TABLE ledger_changes_next RENAME TO ledger_changes;

-- The head row is no longer written by every insert: the head is the greatest of this row, the
-- last policy and the last logged change (see rows::read_bounds). Bring the row up to date once,
-- before the inserts of stored policies leave the log.
UPDATE ledger_head SET head_seq = max(head_seq, COALESCE((SELECT max(seq) FROM ledger_changes), 0));
DELETE FROM ledger_changes WHERE op = 'insert' AND seq IN (SELECT sequence_id FROM ledger);
