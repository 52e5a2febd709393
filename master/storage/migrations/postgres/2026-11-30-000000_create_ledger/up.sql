-- The AnyLog `ledger` table (EdgeLake's PostgreSQL definition), plus `seq`: the change that inserted
-- the policy, which gives ledger order and lets a member resume.
CREATE TABLE ledger (
    sequence_id SERIAL PRIMARY KEY,
    policy_type VARCHAR NOT NULL,
    policy_id VARCHAR NOT NULL,
    company_name VARCHAR,
    date TIMESTAMP NOT NULL DEFAULT NOW(),
    host VARCHAR NOT NULL,
    status VARCHAR,
    policy VARCHAR,
    seq BIGINT NOT NULL
);
CREATE UNIQUE INDEX ledger_policy_id ON ledger (policy_id);
CREATE INDEX ledger_date ON ledger (date);
CREATE UNIQUE INDEX ledger_seq ON ledger (seq);

-- Every insert and delete, in commit order: what StreamLedger replays to a resuming member.
CREATE TABLE ledger_changes (
    seq BIGINT PRIMARY KEY,
    op VARCHAR NOT NULL,
    policy_id VARCHAR NOT NULL,
    policy_type VARCHAR NOT NULL,
    policy VARCHAR
);

-- One row: the last assigned seq and how far the change log was pruned. Writers update this row
-- first, which serialises them, so seqs commit in increasing order.
CREATE TABLE ledger_head (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    head_seq BIGINT NOT NULL,
    pruned_seq BIGINT NOT NULL
);
INSERT INTO ledger_head (id, head_seq, pruned_seq) VALUES (1, 0, 0);
