//! The signals that stop either binary.

/// Completes on SIGTERM (systemd, Docker, Kubernetes) or Ctrl-C, saying which in the log.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let ctrl_c = tokio::signal::ctrl_c();
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = ctrl_c => tracing::info!("received Ctrl-C; stopping"),
                _ = term.recv() => tracing::info!("received SIGTERM; stopping"),
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops this process");
            let _ = ctrl_c.await;
        }
    }
}
