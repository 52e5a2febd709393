DROP TABLE ledger_chain;
