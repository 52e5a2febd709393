//! The JSON-RPC plumbing of [`ChainClient`]: requests and batches (views pinned to one block,
//! checked against its hash), the node's errors as [`ChainError`]s, and the shapes of the
//! node's answers this client reads.

use super::*;

impl ChainClient {
    // ---- reads ----

    /// `at`, with [`At::Latest`] replaced by the head, so that a read of several requests sees
    /// one block.
    pub(super) async fn pin(&self, at: At) -> Result<At> {
        Ok(match at {
            At::Latest => At::Block(self.head().await?),
            other => other,
        })
    }

    /// The eth_call request of `call` to the contract.
    pub(super) fn call<C: SolCall>(&self, call: &C) -> CallRequest {
        CallRequest::new(None, Some(self.inner.contract), call.abi_encode().into())
    }

    /// Runs view `calls` at `at`, `batch_size` per JSON-RPC batch, `concurrent_batches` batches
    /// at once, and returns their answers in order. With [`At::Block`] each batch also asks
    /// for the block of that number and fails if its hash is not the pinned one.
    pub(super) async fn views<C>(&self, calls: Vec<C>, at: At) -> Result<Vec<C::Return>>
    where
        C: SolCall + Send + Sync,
        C::Return: Send,
    {
        let size = self.inner.options.batch_size.max(1);
        let mut chunks = Vec::with_capacity(calls.len().div_ceil(size));
        let mut calls = calls.into_iter().peekable();
        while calls.peek().is_some() {
            chunks.push(calls.by_ref().take(size).collect::<Vec<C>>());
        }
        // Each chunk moves into its future: a closure borrowing the chunks makes a future
        // that rustc cannot prove `Send` for every lifetime, and callers box it as `Send`.
        let answers: Vec<Vec<C::Return>> = futures_util::stream::iter(
            chunks
                .into_iter()
                .map(|chunk| async move { self.view_batch(&chunk, at).await }),
        )
        .buffered(self.inner.options.concurrent_batches.max(1))
        .try_collect()
        .await?;
        Ok(answers.into_iter().flatten().collect())
    }

    /// One view `call` at `at`.
    pub(super) async fn view<C>(&self, call: C, at: At) -> Result<C::Return>
    where
        C: SolCall + Send + Sync,
        C::Return: Send,
    {
        let mut answers = self.views(vec![call], at).await?;
        Ok(answers.pop().expect("one call, one answer"))
    }

    async fn view_batch<C: SolCall>(&self, calls: &[C], at: At) -> Result<Vec<C::Return>> {
        let param = at.param();
        if calls.len() == 1 && !matches!(at, At::Block(_)) {
            // A lone call needs no batch (and some endpoints answer batches more slowly).
            let answer: Bytes = self
                .request_at("eth_call", (self.call(&calls[0]), &param), &at)
                .await?;
            return Ok(vec![decode::<C>(&answer, self.inner.contract)?]);
        }
        let mut batch = self.inner.rpc.new_batch();
        let check = match at {
            At::Block(_) => Some(self.add(&mut batch, "eth_getBlockByNumber", &(&param, false))?),
            _ => None,
        };
        let waiters = calls
            .iter()
            .map(|call| self.add::<_, Bytes>(&mut batch, "eth_call", &(self.call(call), &param)))
            .collect::<Result<Vec<_>>>()?;
        batch
            .send()
            .await
            .map_err(|e| self.error("eth_call", e, &at))?;
        if let Some(check) = check {
            self.check_block(check.await, &at)?;
        }
        let mut answers = Vec::with_capacity(calls.len());
        for waiter in waiters {
            let answer = waiter.await.map_err(|e| self.error("eth_call", e, &at))?;
            answers.push(decode::<C>(&answer, self.inner.contract)?);
        }
        Ok(answers)
    }

    /// Adds a call to a batch.
    pub(super) fn add<P: RpcSend, R: RpcRecv>(
        &self,
        batch: &mut alloy::rpc::client::BatchRequest<'_>,
        method: &'static str,
        params: &P,
    ) -> Result<alloy::rpc::client::Waiter<R>> {
        batch
            .add_call(method, params)
            .map_err(|e| self.error(method, e, &At::Latest))
    }

    /// The pinned block's check: the block of its number must still have its hash.
    pub(super) fn check_block(
        &self,
        answer: Result<Option<RpcBlock>, TransportError>,
        at: &At,
    ) -> Result<()> {
        let At::Block(pinned) = at else {
            return Ok(());
        };
        match answer.map_err(|e| self.error("eth_getBlockByNumber", e, at))? {
            Some(block) if block.hash == pinned.hash => Ok(()),
            _ => Err(ChainError::UnknownBlock {
                block: at.describe(),
            }),
        }
    }

    // ---- requests and errors ----

    pub(super) async fn request<P: RpcSend, R: RpcRecv>(
        &self,
        method: &'static str,
        params: P,
    ) -> Result<R> {
        self.request_at(method, params, &At::Latest).await
    }

    /// A single request; `at` only names the block in an [`ChainError::UnknownBlock`].
    pub(super) fn request_at<P: RpcSend, R: RpcRecv>(
        &self,
        method: &'static str,
        params: P,
        at: &At,
    ) -> impl Future<Output = Result<R>> + Send {
        let call = self.inner.rpc.request(method, params);
        let at = *at;
        async move { call.await.map_err(|e| self.error(method, e, &at)) }
    }

    /// The [`ChainError`] of a failed request.
    pub(super) fn error(&self, method: &str, error: TransportError, at: &At) -> ChainError {
        match error {
            RpcError::ErrorResp(payload) => {
                if let Some(reason) = revert_reason(&payload) {
                    return ChainError::Reverted { reason, tx: None };
                }
                let message = payload.message.to_lowercase();
                // geth, op-geth and ganache: "header not found"; others "unknown block".
                if ["header not found", "unknown block", "block not found"]
                    .iter()
                    .any(|m| message.contains(m))
                {
                    return ChainError::UnknownBlock {
                        block: at.describe(),
                    };
                }
                ChainError::Rpc {
                    method: method.to_string(),
                    code: payload.code,
                    message: payload.message.to_string(),
                }
            }
            RpcError::Transport(kind) => ChainError::Unreachable {
                url: self.inner.endpoint.clone(),
                reason: transport_reason(&kind),
            },
            RpcError::DeserError { err, text } => ChainError::Malformed {
                method: method.to_string(),
                reason: format!("{err}: {}", truncate(&text, 200)),
            },
            other => ChainError::Malformed {
                method: method.to_string(),
                reason: other.to_string(),
            },
        }
    }
}

/// A contract call's answer decoded; an empty answer means no code at the address.
pub(super) fn decode<C: SolCall>(answer: &[u8], contract: Address) -> Result<C::Return> {
    if answer.is_empty() {
        return Err(ChainError::NoContract { address: contract });
    }
    C::abi_decode_returns(answer).map_err(|e| ChainError::Malformed {
        method: C::SIGNATURE.to_string(),
        reason: e.to_string(),
    })
}

pub(super) fn to_u64(value: U256, what: &str) -> Result<u64> {
    u64::try_from(value).map_err(|_| ChainError::Malformed {
        method: what.to_string(),
        reason: format!("{value} does not fit 64 bits"),
    })
}

/// Whether a transport error happened before the request left (connection refused, no route):
/// a transaction in it certainly did not reach the node.
pub(super) fn never_sent(kind: &TransportErrorKind) -> bool {
    kind.as_custom()
        .and_then(|e| e.downcast_ref::<reqwest::Error>())
        .is_some_and(|e| e.is_connect())
}

/// What went wrong with a request, without the URL (reqwest's errors name it, and its path may
/// hold an API key): what failed, then each underlying cause.
pub(super) fn transport_reason(kind: &TransportErrorKind) -> String {
    match kind {
        TransportErrorKind::HttpError(http) => {
            format!("HTTP status {}: {}", http.status, truncate(&http.body, 200))
        }
        TransportErrorKind::Custom(error) => match error.downcast_ref::<reqwest::Error>() {
            Some(error) => {
                let mut reason = if error.is_timeout() {
                    "no answer in time".to_string()
                } else if error.is_connect() {
                    "cannot connect".to_string()
                } else {
                    "the request failed".to_string()
                };
                let mut source = std::error::Error::source(error);
                while let Some(cause) = source {
                    reason.push_str(&format!(": {cause}"));
                    source = cause.source();
                }
                reason
            }
            None => error.to_string(),
        },
        other => other.to_string(),
    }
}

/// The revert reason of an error answer, if it is a revert: decoded from the revert data
/// (`Error(string)`, or a `Panic(uint256)` code), else taken from the message
/// (`execution reverted: REASON`, ganache's `... revert REASON`); "no reason given" for a
/// revert without one.
pub(super) fn revert_reason(payload: &ErrorPayload) -> Option<String> {
    let message = &payload.message;
    if !message.to_lowercase().contains("revert") {
        return None;
    }
    if let Some(data) = payload.as_revert_data() {
        if let Ok(revert) = Revert::abi_decode(&data) {
            return Some(revert.reason);
        }
        if let Ok(panic) = Panic::abi_decode(&data) {
            return Some(match panic.kind() {
                Some(kind) => format!("panic: {kind}"),
                None => format!("panic code {}", panic.code),
            });
        }
    }
    for marker in ["execution reverted: ", "revert "] {
        if let Some(at) = message.find(marker) {
            let reason = message[at + marker.len()..].trim();
            if !reason.is_empty() {
                return Some(reason.to_string());
            }
        }
    }
    Some("no reason given".into())
}

/// `scheme://host:port`, with `/…` when the URL has a path: what is safe to log.
pub(super) fn redact(url: &reqwest::Url) -> String {
    let mut shown = format!("{}://{}", url.scheme(), url.host_str().unwrap_or(""));
    if let Some(port) = url.port() {
        shown.push_str(&format!(":{port}"));
    }
    if !matches!(url.path(), "" | "/") || url.query().is_some() {
        shown.push_str("/…");
    }
    shown
}

fn truncate(text: &str, limit: usize) -> String {
    match text.char_indices().nth(limit) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_string(),
    }
}

/// The call object of `eth_call` and `eth_estimateGas`. The input goes as both `input` (the
/// current name) and `data` (what older nodes read).
#[derive(Debug, Clone, Serialize)]
pub(super) struct CallRequest {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) from: Option<Address>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) to: Option<Address>,
    #[serde(
        skip_serializing_if = "Option::is_none",
        with = "alloy::serde::quantity::opt"
    )]
    pub(super) gas: Option<u64>,
    pub(super) input: Bytes,
    pub(super) data: Bytes,
}

impl CallRequest {
    pub(super) fn new(from: Option<Address>, to: Option<Address>, input: Bytes) -> CallRequest {
        CallRequest {
            from,
            to,
            gas: None,
            data: input.clone(),
            input,
        }
    }
}

/// The fields of a block this client reads (the rest of the node's answer is ignored).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct RpcBlock {
    pub(super) number: U64,
    pub(super) hash: B256,
    pub(super) timestamp: U64,
    pub(super) gas_limit: U64,
    #[serde(default)]
    pub(super) base_fee_per_gas: Option<U256>,
}

impl RpcBlock {
    pub(super) fn block(self) -> Block {
        Block {
            number: self.number.to(),
            hash: self.hash,
            timestamp: self.timestamp.to(),
        }
    }
}

/// The fields of a receipt this client reads.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct RpcReceipt {
    pub(super) transaction_hash: TxHash,
    pub(super) block_number: U64,
    pub(super) block_hash: B256,
    #[serde(default)]
    pub(super) status: Option<U64>,
    pub(super) gas_used: U64,
    #[serde(default)]
    pub(super) contract_address: Option<Address>,
}

/// The fields of a transaction this client reads (to replay a failed one).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct RpcTransaction {
    pub(super) from: Address,
    #[serde(default)]
    pub(super) to: Option<Address>,
    pub(super) input: Bytes,
    pub(super) gas: U64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_paths_and_credentials() {
        let shown = |url: &str| redact(&url.parse().unwrap());
        assert_eq!(shown("http://127.0.0.1:8545"), "http://127.0.0.1:8545");
        assert_eq!(
            shown("https://mainnet.example/v3/0123456789abcdef"),
            "https://mainnet.example/…"
        );
        assert_eq!(
            shown("https://user:secret@node.example:8443/?key=abc"),
            "https://node.example:8443/…"
        );
    }

    #[test]
    fn bad_urls_are_refused_without_repeating_them() {
        for url in ["not a url with-secret", "ws://127.0.0.1:8545/secret"] {
            let error = ChainClient::connect(url, Address::ZERO, None, None).unwrap_err();
            assert!(matches!(error, ChainError::InvalidUrl(_)), "{error}");
            assert!(!error.to_string().contains("secret"), "{error}");
        }
    }

    fn payload(json: &str) -> ErrorPayload {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn revert_reasons_from_data_and_messages() {
        // ganache's eth_call: the Error(string) encoding as data.
        let data = "0x08c379a00000000000000000000000000000000000000000000000000000000000000020000000000000000000000000000000000000000000000000000000000000000d706f6c6963792065786973747300000000000000000000000000000000000000";
        let call = payload(&format!(
            r#"{{"code":-32000,"message":"VM Exception while processing transaction: revert policy exists","data":"{data}"}}"#
        ));
        assert_eq!(revert_reason(&call).as_deref(), Some("policy exists"));
        // ganache's eth_estimateGas: an object holding it.
        let estimate = payload(&format!(
            r#"{{"code":-32000,"message":"VM Exception while processing transaction: revert policy exists","data":{{"hash":null,"programCounter":485,"result":"{data}","reason":"policy exists","message":"revert"}}}}"#
        ));
        assert_eq!(revert_reason(&estimate).as_deref(), Some("policy exists"));
        // geth without data.
        let geth = payload(r#"{"code":3,"message":"execution reverted: policy not found"}"#);
        assert_eq!(revert_reason(&geth).as_deref(), Some("policy not found"));
        let bare = payload(
            r#"{"code":-32000,"message":"VM Exception while processing transaction: revert","data":"0x"}"#,
        );
        assert_eq!(revert_reason(&bare).as_deref(), Some("no reason given"));
        let other =
            payload(r#"{"code":-32000,"message":"insufficient funds for gas * price + value"}"#);
        assert_eq!(revert_reason(&other), None);
    }
}
