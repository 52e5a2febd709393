DROP TABLE ledger_head;
DROP TABLE ledger_changes;
DROP TABLE ledger;
