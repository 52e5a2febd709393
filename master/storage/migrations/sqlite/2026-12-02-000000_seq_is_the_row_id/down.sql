UPDATE ledger_head SET head_seq = max(head_seq, COALESCE((SELECT max(seq) FROM ledger_changes), 0),
    COALESCE((SELECT max(sequence_id) FROM ledger), 0));
INSERT INTO ledger_changes (seq, op, policy_id, policy_type, policy)
    SELECT seq, 'insert', policy_id, policy_type, policy FROM ledger
    WHERE seq > (SELECT pruned_seq FROM ledger_head WHERE id = 1);

CREATE TABLE ledger_changes_prev (
    seq BIGINT PRIMARY KEY,
    op VARCHAR NOT NULL,
    policy_id VARCHAR NOT NULL,
    policy_type VARCHAR NOT NULL,
    policy VARCHAR
);
INSERT INTO ledger_changes_prev SELECT seq, op, policy_id, policy_type, policy FROM ledger_changes;
DROP TABLE ledger_changes;
ALTER TABLE ledger_changes_prev RENAME TO ledger_changes;

CREATE TABLE ledger_prev (
    sequence_id INTEGER PRIMARY KEY AUTOINCREMENT,
    policy_type VARCHAR NOT NULL,
    policy_id VARCHAR NOT NULL,
    company_name VARCHAR,
    date TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    host VARCHAR NOT NULL,
    status VARCHAR,
    policy VARCHAR,
    seq BIGINT NOT NULL
);
INSERT INTO ledger_prev (sequence_id, policy_type, policy_id, company_name, date, host, status, policy, seq)
    SELECT sequence_id, policy_type, policy_id, company_name, date, host, status, policy, seq FROM ledger;
DROP TABLE ledger;
ALTER TABLE ledger_prev RENAME TO ledger;
CREATE UNIQUE INDEX ledger_policy_id ON ledger (policy_id);
CREATE INDEX ledger_date ON ledger (date);
CREATE UNIQUE INDEX ledger_seq ON ledger (seq);
