CREATE UNIQUE INDEX ledger_seq ON ledger (seq);
