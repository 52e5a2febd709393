//! A diagnostic the storage suite (`tests/tests/storage.rs`) uses, kept apart from the jobs:
//! which plans PostgreSQL ran the prepared statements of this storage's connections with. It
//! reads the sessions' own `pg_prepared_statements`, so it needs the storage's connections and
//! cannot live in the test.

use std::sync::PoisonError;

use diesel::prelude::*;

use super::pool::WriteConnection;
use super::{AnyConnection, DieselStorage};
use crate::StorageError;

impl DieselStorage {
    /// On PostgreSQL, how often the prepared statements of the connection kept for writes and of
    /// the one the next read would use ran with a generic plan and with a custom plan
    /// (`pg_prepared_statements`; statements without parameters, which always run one plan, are
    /// left out); `None` on SQLite.
    /// A diagnostic: a generic plan made while the ledger was small would stay cached.
    pub fn plan_counts(&self) -> Result<Option<(u64, u64)>, StorageError> {
        #[derive(QueryableByName)]
        struct Counts {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            generic: i64,
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            custom: i64,
        }
        fn counts(pg: &mut PgConnection) -> Result<(u64, u64), StorageError> {
            let counts: Counts = diesel::sql_query(
                "SELECT COALESCE(sum(generic_plans) FILTER (WHERE cardinality(parameter_types) > 0), 0)::bigint AS generic, \
                        COALESCE(sum(custom_plans), 0)::bigint AS custom FROM pg_prepared_statements",
            )
            .get_result(pg)?;
            Ok((counts.generic as u64, counts.custom as u64))
        }
        // The read connection goes back before the write one is locked: writes take that lock
        // first and a pool connection second.
        let (mut generic, mut custom) = {
            let mut read = self.conn()?;
            let AnyConnection::Postgres(pg) = read.conn() else {
                return Ok(None);
            };
            counts(pg)?
        };
        let mut kept = self.writes.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(WriteConnection { link, .. }) = kept.as_mut()
            && let AnyConnection::Postgres(pg) = link.conn()
        {
            let (g, c) = counts(pg)?;
            generic += g;
            custom += c;
        }
        Ok(Some((generic, custom)))
    }
}
