//! Master addresses, connections to them, and readable descriptions of what went wrong.

use std::fmt;
use std::time::Duration;

use ledger_proto::pb::ledger_service_client::LedgerServiceClient;
use tonic::transport::{Channel, Endpoint};

/// A connected client of a master.
pub type Client = LedgerServiceClient<Channel>;

/// The largest message accepted from a master: far above any policy, so only a broken stream
/// hits it.
const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// How often an idle connection is checked with an HTTP/2 ping, so that a master that vanished
/// without closing the connection (a cut network) is noticed.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// The address of a master, as the operator wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasterAddr {
    text: String,
    uri: String,
}

impl MasterAddr {
    /// Reads `HOST:PORT` or `http://HOST:PORT`.
    pub fn parse(text: &str) -> Result<MasterAddr, String> {
        let text = text.trim();
        if text.is_empty() {
            return Err("a master address is empty".into());
        }
        if text.starts_with("https://") {
            return Err(format!("{text}: TLS is not supported yet; use HOST:PORT"));
        }
        let uri = if text.contains("://") {
            text.to_string()
        } else {
            format!("http://{text}")
        };
        Endpoint::from_shared(uri.clone()).map_err(|e| format!("{text}: {}", describe(&e)))?;
        Ok(MasterAddr {
            text: text.to_string(),
            uri,
        })
    }

    /// Connects, failing after `timeout`.
    pub async fn connect(&self, timeout: Duration) -> Result<Client, String> {
        let endpoint = self.endpoint(timeout)?;
        let channel = tokio::time::timeout(timeout, endpoint.connect())
            .await
            .map_err(|_| format!("no answer within {timeout:?}"))?
            .map_err(|e| describe(&e))?;
        Ok(client(channel))
    }

    /// A client that connects at its first call and reconnects after a failure, each call
    /// bounded by `timeout`: a relay's long-lived path for forwarding writes.
    pub fn lazy_client(&self, timeout: Duration) -> Result<Client, String> {
        Ok(client(
            self.endpoint(timeout)?.timeout(timeout).connect_lazy(),
        ))
    }

    fn endpoint(&self, timeout: Duration) -> Result<Endpoint, String> {
        Ok(Endpoint::from_shared(self.uri.clone())
            .map_err(|e| describe(&e))?
            .connect_timeout(timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_INTERVAL)
            .keep_alive_while_idle(true))
    }
}

fn client(channel: Channel) -> Client {
    LedgerServiceClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

impl fmt::Display for MasterAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Connects to the first of `masters` that answers, in order; the error lists why each failed.
pub async fn connect_first(
    masters: &[MasterAddr],
    timeout: Duration,
) -> Result<(Client, &MasterAddr), String> {
    if masters.is_empty() {
        return Err("no master address given (--master or LEDGER_MASTER)".into());
    }
    let mut failures = Vec::new();
    for master in masters {
        match master.connect(timeout).await {
            Ok(client) => return Ok((client, master)),
            Err(e) => failures.push(format!("{master}: {e}")),
        }
    }
    Err(failures.join("; "))
}

/// An error with its causes, `outer: inner: root`, without repeating a cause that its parent
/// already quotes (transport errors do).
pub fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// A gRPC status as one line: its message, or its code when the message is empty.
pub fn describe_status(status: &tonic::Status) -> String {
    if status.message().is_empty() {
        format!("{:?}", status.code())
    } else {
        format!("{:?}: {}", status.code(), status.message())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_with_or_without_a_scheme() {
        let bare = MasterAddr::parse("127.0.0.1:32048").unwrap();
        assert_eq!(bare.uri, "http://127.0.0.1:32048");
        assert_eq!(bare.to_string(), "127.0.0.1:32048");
        assert_eq!(
            MasterAddr::parse("http://master:32048").unwrap().uri,
            "http://master:32048"
        );
        assert!(MasterAddr::parse("").is_err());
        assert!(MasterAddr::parse("https://master:1").is_err());
        assert!(MasterAddr::parse("not an address").is_err());
    }
}
