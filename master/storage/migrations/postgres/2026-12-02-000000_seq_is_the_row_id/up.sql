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

-- A batch of inserts in one call (storage's write path): lock the head, skip the ids already
-- stored or repeated, number the rest from the head, store them, move the head, notify the other
-- masters; returns (ord, seq) per stored insert and (0, new head). A function, so that PostgreSQL
-- parses and plans its statement once per connection: sent as text, its parsing and custom
-- planning cost ~1 ms of PostgreSQL's CPU per commit, more than the insert itself (issue 16).
-- That one plan is made when the connection first calls it, maybe while the ledger is empty, when
-- scanning the whole table to look the ids up looks cheapest, and then stays: without sequential
-- scans it looks each id up by index, right for every size (the input is a few rows).
CREATE FUNCTION ledger_insert_batch(
    ids text[], types text[], companies text[], hosts text[], policies text[],
    dates timestamp[], statuses text[], channel text)
RETURNS TABLE (ord bigint, seq bigint)
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH head AS (SELECT head_seq FROM ledger_head WHERE id = 1 FOR UPDATE),
    input AS (SELECT * FROM unnest(ids, types, companies, hosts, policies, dates, statuses)
        WITH ORDINALITY AS r(policy_id, policy_type, company_name, host, policy, date, status, ord)),
    fresh AS (SELECT DISTINCT ON (policy_id) * FROM input
        WHERE NOT EXISTS (SELECT 1 FROM ledger l WHERE l.policy_id = input.policy_id)
        ORDER BY policy_id, ord),
    numbered AS (SELECT fresh.*, head.head_seq + row_number() OVER (ORDER BY ord) AS seq
        FROM fresh, head),
    stored AS (INSERT INTO ledger (sequence_id, policy_type, policy_id, company_name, date, host, status, policy, seq)
        SELECT seq, policy_type, policy_id, company_name, date, host, status, policy, seq FROM numbered),
    moved AS (UPDATE ledger_head SET head_seq = (SELECT max(seq) FROM numbered)
        WHERE id = 1 AND EXISTS (SELECT 1 FROM numbered) RETURNING head_seq)
    SELECT numbered.ord, numbered.seq FROM numbered
    UNION ALL SELECT 0::bigint, moved.head_seq FROM moved, LATERAL (SELECT pg_notify(channel, moved.head_seq::text)) AS n;
END
$$;
