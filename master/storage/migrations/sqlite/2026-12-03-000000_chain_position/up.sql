-- A master that follows a blockchain (--ethereum-rpc) keeps here the block whose contract state
-- its ledger holds: one row, written after each applied poll.
CREATE TABLE ledger_chain (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    block_number BIGINT NOT NULL,
    block_hash TEXT NOT NULL,
    transaction_count BIGINT NOT NULL
);
