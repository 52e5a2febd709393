DROP FUNCTION ledger_insert_batch(text[], text[], text[], text[], text[], timestamp[], text[], text);
INSERT INTO ledger_changes (seq, op, policy_id, policy_type, policy)
    SELECT seq, 'insert', policy_id, policy_type, policy FROM ledger
    WHERE seq > (SELECT pruned_seq FROM ledger_head WHERE id = 1);
CREATE UNIQUE INDEX ledger_seq ON ledger (seq);
