//! How the async core uses the storage, whose calls block (diesel's connections are
//! synchronous): each call runs on tokio's blocking pool ([`run`]), never on the workers that
//! serve every other call, and reads go in pages of [`PAGE`] rows.

use std::sync::Arc;

use ledger_storage::{Storage, StorageError};

/// Policies or changes read from the storage per query: a replay, a gap filled, a snapshot's
/// pages, a digest extended, the rows a `ListPolicies` call scans.
pub const PAGE: usize = 1000;

/// Runs `call` on `storage` on the blocking pool and waits for it without blocking the caller's
/// worker. A call that panicked fails as [`StorageError::Failed`] (and is logged: the caller may
/// only pass the error on).
pub async fn run<T, F>(storage: &Arc<dyn Storage>, call: F) -> Result<T, StorageError>
where
    T: Send + 'static,
    F: FnOnce(&dyn Storage) -> Result<T, StorageError> + Send + 'static,
{
    let storage = storage.clone();
    tokio::task::spawn_blocking(move || call(&*storage))
        .await
        .unwrap_or_else(|e| {
            tracing::warn!(error = %e, "a storage call on the blocking pool failed");
            Err(StorageError::Failed(format!("storage task failed: {e}")))
        })
}
