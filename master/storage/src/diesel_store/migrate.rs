//! The schema: the migrations of each backend, embedded in the binary and applied at start
//! (on PostgreSQL under an advisory lock, so that masters starting together apply them once).

use diesel::connection::SimpleConnection;
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};

use super::{AnyConnection, DieselStorage};
use crate::StorageError;

const SQLITE_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/sqlite");
const POSTGRES_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/postgres");

/// Held while migrating so that masters starting together on one PostgreSQL apply them once.
const MIGRATION_LOCK_KEY: i64 = 0x4c45_4447_4552; // "LEDGER"

impl DieselStorage {
    /// Applies the pending migrations, logging each one applied.
    pub(super) fn migrate(&self) -> Result<(), StorageError> {
        // Without a deadline: a migration may rewrite a large table.
        let mut link = self.conn()?;
        let applied: Vec<String> = match link.conn() {
            AnyConnection::Sqlite(c) => c
                .run_pending_migrations(SQLITE_MIGRATIONS)
                .map_err(|e| StorageError::Migration(e.to_string()))?
                .iter()
                .map(|v| v.to_string())
                .collect(),
            AnyConnection::Postgres(c) => {
                c.batch_execute(&format!("SELECT pg_advisory_lock({MIGRATION_LOCK_KEY})"))?;
                let result = c
                    .run_pending_migrations(POSTGRES_MIGRATIONS)
                    .map(|v| v.iter().map(|v| v.to_string()).collect())
                    .map_err(|e| StorageError::Migration(e.to_string()));
                c.batch_execute(&format!("SELECT pg_advisory_unlock({MIGRATION_LOCK_KEY})"))?;
                result?
            }
        };
        for version in &applied {
            tracing::info!(%version, database = %self.url, "applied migration");
        }
        Ok(())
    }
}
