//! The diesel table definitions; the DDL lives in `master/migrations/{sqlite,postgres}`.

diesel::table! {
    /// The AnyLog `ledger` table: one row per stored policy. `sequence_id` is the row's `seq`.
    ledger (sequence_id) {
        sequence_id -> BigInt,
        policy_type -> Text,
        policy_id -> Text,
        company_name -> Nullable<Text>,
        date -> Timestamp,
        host -> Text,
        status -> Nullable<Text>,
        policy -> Nullable<Text>,
        seq -> BigInt,
    }
}

diesel::table! {
    /// The change log: every insert and delete with its seq.
    ledger_changes (seq) {
        seq -> BigInt,
        op -> Text,
        policy_id -> Text,
        policy_type -> Text,
        policy -> Nullable<Text>,
    }
}

diesel::table! {
    /// The single row holding the last assigned seq and the pruned prefix of the change log.
    ledger_head (id) {
        id -> Integer,
        head_seq -> BigInt,
        pruned_seq -> BigInt,
    }
}

diesel::table! {
    /// The block whose contract state the ledger holds, on a master that follows a blockchain.
    ledger_chain (id) {
        id -> Integer,
        block_number -> BigInt,
        block_hash -> Text,
        transaction_count -> BigInt,
    }
}
