//! The web console: a read-only page the master serves on its HTTP listener (`--http-addr`,
//! beside `/metrics` and `/health`), with its assets embedded in the binary (plain JS and CSS,
//! no external CDN, no build step), and the JSON it reads:
//!
//! | route | what |
//! | --- | --- |
//! | `/`, `/console` | the page (`/?token=TOKEN` sets the `ledger_token` cookie and redirects to `/`) |
//! | `/console.js`, `/console.css` | its script and style |
//! | `/api/info` | head, digest, policy counts by type, health of the database, writes and streams |
//! | `/api/policies` | every policy (`{"head_seq": N, "policies": [...]}`), streamed in chunks |
//! | `/api/subscribers` | the subscribers, by lag (the most behind first) |
//! | `/api/feed` | server-sent events: each change (`event: change`, `id:` its seq), `caught_up`, keep-alive comments; a snapshot (`reset`, `snapshot`s) when behind what can be replayed |
//!
//! Handlers only translate: they call the [`Ledger`] (its info, its file, its subscriptions) and
//! the subscriber source. With an auth file, every route needs a reader's token, as gRPC does:
//! `Authorization: Bearer TOKEN` or the `ledger_token` cookie ([`Authorizer::authorize`]).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Weak};
use std::time::Duration;

use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use ledger_ops::metrics_endpoint::{HttpBody, Peer, RouteFuture, Routes, full};
use ledger_storage::ChangeKind;
use tokio::sync::watch;
use tokio_stream::StreamExt;

use crate::auth::{AuthError, Authorizer, Role};
use crate::ledger::{Ledger, LedgerFile};
use crate::limits::StreamLimiter;
use crate::subscription::Event;
use crate::writer::WriterHealth;

/// The page, its script and its style, embedded in the binary.
const PAGE: &str = include_str!("console/index.html");
const SCRIPT: &str = include_str!("console/console.js");
const STYLE: &str = include_str!("console/console.css");

/// The cookie that holds the console's token.
pub const TOKEN_COOKIE: &str = "ledger_token";

/// How often a quiet feed sends a keep-alive comment (proxies close idle connections).
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// How many bytes of the ledger's file one chunk of `/api/policies` carries.
const POLICIES_CHUNK: usize = 256 << 10;

/// What the console is built from.
pub struct ConsoleOptions {
    /// The ledger, held weakly: the console does not keep the writer alive after shutdown.
    pub ledger: Weak<Ledger>,
    /// The auth file's callers; `None`: no auth, anyone may read.
    pub authorizer: Option<Arc<Authorizer>>,
    /// The writer's state, on a master that writes (not a relay).
    pub writes: Option<watch::Receiver<WriterHealth>>,
    /// Whether this master is a relay.
    pub relay: bool,
    /// The gRPC edge's stream limits (`--max-streams`, `--max-streams-per-client`): each open
    /// `/api/feed` takes a place, as a `StreamLedger` does.
    pub streams: StreamLimiter,
}

/// The console's routes; cheap to clone.
#[derive(Clone)]
pub struct Console(Arc<Inner>);

struct Inner {
    options: ConsoleOptions,
    /// The policy counts by type at one head, once counted.
    counts: tokio::sync::Mutex<Option<CountsAt>>,
}

/// The policy counts by type of the ledger at one head.
struct CountsAt {
    /// The feed's epoch (a relay's copy replaced since is another ledger).
    epoch: u64,
    head_seq: u64,
    counts: Arc<BTreeMap<String, u64>>,
}

/// Why a console request is refused.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// No valid credentials, or a role that does not read.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// The ledger could not answer.
    #[error(transparent)]
    Ledger(#[from] crate::error::LedgerError),
    /// The master is stopping.
    #[error("the master is shutting down")]
    ShuttingDown,
    /// A path the console does not serve.
    #[error(
        "not found: the console serves /, /api/info, /api/policies, /api/subscribers and /api/feed"
    )]
    NotFound,
    /// A method other than GET or HEAD.
    #[error("the console is read-only: GET only")]
    MethodNotAllowed,
}

impl ConsoleError {
    fn status(&self) -> StatusCode {
        match self {
            ConsoleError::Auth(e) if e.is_unauthenticated() => StatusCode::UNAUTHORIZED,
            ConsoleError::Auth(_) => StatusCode::FORBIDDEN,
            ConsoleError::Ledger(crate::error::LedgerError::TooManyStreams(_)) => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ConsoleError::Ledger(_) | ConsoleError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            ConsoleError::NotFound => StatusCode::NOT_FOUND,
            ConsoleError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        }
    }

    fn response(&self) -> Response<HttpBody> {
        let text = match self {
            ConsoleError::Auth(AuthError::CredentialsMissing) => format!(
                "unauthorized: a reader's token is missing: send `Authorization: Bearer TOKEN` or the `{TOKEN_COOKIE}` cookie (open /?token=TOKEN once to set it)\n"
            ),
            ConsoleError::Auth(AuthError::MalformedAuthorization) => {
                "unauthorized: the Authorization header must be `Bearer TOKEN`\n".to_string()
            }
            ConsoleError::Auth(AuthError::UnknownToken) => {
                "unauthorized: unknown token\n".to_string()
            }
            other => format!("{other}\n"),
        };
        let mut response = text_response(self.status(), "text/plain; charset=utf-8", text);
        if self.status() == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"ledger\""),
            );
        }
        response
    }
}

impl Console {
    /// The console over `options`.
    pub fn new(options: ConsoleOptions) -> Self {
        Console(Arc::new(Inner {
            options,
            counts: tokio::sync::Mutex::new(None),
        }))
    }

    /// Answers one request.
    pub async fn respond(&self, request: Request<Incoming>) -> Response<HttpBody> {
        match self.answer(&request).await {
            Ok(response) => response,
            Err(e) => {
                if let ConsoleError::Ledger(e) = &e {
                    tracing::debug!(error = %e, path = request.uri().path(), "console: the ledger could not answer");
                }
                e.response()
            }
        }
    }

    async fn answer(
        &self,
        request: &Request<Incoming>,
    ) -> Result<Response<HttpBody>, ConsoleError> {
        if request.method() != Method::GET && request.method() != Method::HEAD {
            return Err(ConsoleError::MethodNotAllowed);
        }
        let path = request.uri().path();
        // `/?token=TOKEN`: checked, kept in a cookie, and taken out of the address bar.
        if (path == "/" || path == "/console")
            && let Some(token) = query_value(request.uri().query(), "token")
        {
            self.check_token(&token)?;
            return Ok(token_cookie_redirect(&token));
        }
        self.authorize(request)?;
        match path {
            "/" | "/console" => Ok(text_response(
                StatusCode::OK,
                "text/html; charset=utf-8",
                PAGE,
            )),
            "/console.js" => Ok(text_response(
                StatusCode::OK,
                "text/javascript; charset=utf-8",
                SCRIPT,
            )),
            "/console.css" => Ok(text_response(
                StatusCode::OK,
                "text/css; charset=utf-8",
                STYLE,
            )),
            "/api/info" => self.info().await,
            "/api/policies" => self.policies().await,
            "/api/subscribers" => self.subscribers(),
            "/api/feed" => self.feed(request),
            _ => Err(ConsoleError::NotFound),
        }
    }

    /// The caller may read: always without an auth file; with one, a known token of any role.
    fn authorize(&self, request: &Request<Incoming>) -> Result<(), ConsoleError> {
        let Some(authorizer) = &self.0.options.authorizer else {
            return Ok(());
        };
        let mut headers = http::HeaderMap::new();
        if let Some(value) = request.headers().get(header::AUTHORIZATION) {
            headers.insert(header::AUTHORIZATION, value.clone());
        } else if let Some(token) = cookie_token(request.headers()) {
            let value = HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|_| AuthError::MalformedAuthorization)?;
            headers.insert(header::AUTHORIZATION, value);
        }
        let metadata = tonic::metadata::MetadataMap::from_headers(headers);
        authorizer.authorize(&metadata, None, Role::Reader, "read the console")?;
        Ok(())
    }

    /// `token` is a reader's token (or there is no auth file).
    fn check_token(&self, token: &str) -> Result<(), ConsoleError> {
        let Some(authorizer) = &self.0.options.authorizer else {
            return Ok(());
        };
        let mut metadata = tonic::metadata::MetadataMap::new();
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| AuthError::MalformedAuthorization)?;
        metadata.insert("authorization", value);
        authorizer.authorize(&metadata, None, Role::Reader, "read the console")?;
        Ok(())
    }

    fn ledger(&self) -> Result<Arc<Ledger>, ConsoleError> {
        self.0
            .options
            .ledger
            .upgrade()
            .ok_or(ConsoleError::ShuttingDown)
    }

    /// `/api/info`: `GetLedgerInfo`'s answer, the counts by type and the health.
    async fn info(&self) -> Result<Response<HttpBody>, ConsoleError> {
        let ledger = self.ledger()?;
        let feed = ledger.feed().clone();
        let database_up = feed.database_up();
        let ready = feed.ready();
        let streams = feed.subscriber_count();
        let writes = match &self.0.options.writes {
            None if self.0.options.relay => "upstream (a relay forwards writes)".to_string(),
            None => "unknown".to_string(),
            Some(writes) => match &*writes.borrow() {
                WriterHealth::Writing => "writing".to_string(),
                WriterHealth::DiskFull(reason) => format!("disk full: {reason}"),
                WriterHealth::Unavailable(reason) => format!("unavailable: {reason}"),
                WriterHealth::Failed(reason) => format!("failed: {reason}"),
            },
        };
        let health = serde_json::json!({
            "database": if database_up { "up" } else { "down" },
            "writes": writes,
            "writes_ok": matches!(
                self.0.options.writes.as_ref().map(|w| w.borrow().clone()),
                Some(WriterHealth::Writing) | None
            ),
            "streams": streams,
            "ready": ready,
            "relay": self.0.options.relay,
        });
        // A relay without a copy, a database down: the health still shows.
        let (info, (counts_seq, counts)) = match ledger.info().await {
            Ok(info) => {
                let counts = self.counts(&ledger).await?;
                (Some(info), counts)
            }
            Err(e) if !ready || !database_up => {
                tracing::debug!(error = %e, "console: no ledger info");
                (None, (0, Arc::new(BTreeMap::new())))
            }
            Err(e) => return Err(e.into()),
        };
        let body = serde_json::json!({
            "head_seq": info.as_ref().map(|i| i.head_seq),
            "policy_count": info.as_ref().map(|i| i.policy_count),
            "digest": info.as_ref().map(|i| i.digest.clone()),
            "oldest_replayable_seq": info.as_ref().map(|i| i.oldest_replayable_seq),
            "chain": info.as_ref().and_then(|i| i.chain.as_ref()).map(|(position, lag)| serde_json::json!({
                "block": position.block_number,
                "lag_blocks": lag,
            })),
            "counts": &*counts,
            // The head the counts were read at: the same as `head_seq` unless a change came
            // in between.
            "counts_seq": counts_seq,
            "health": health,
        });
        Ok(json_response(body.to_string()))
    }

    /// The policy counts by type at the ledger's head: counted from the ledger's file (which
    /// the master reads once per head), once per head.
    async fn counts(
        &self,
        ledger: &Ledger,
    ) -> Result<(u64, Arc<BTreeMap<String, u64>>), ConsoleError> {
        let epoch = ledger.feed().epoch();
        let mut cached = self.0.counts.lock().await;
        if let Some(at) = cached.as_ref()
            && at.epoch == epoch
            && at.head_seq == ledger.feed().head()
        {
            return Ok((at.head_seq, at.counts.clone()));
        }
        let file = ledger.file().await?;
        let counts = tokio::task::spawn_blocking({
            let file = file.clone();
            move || Arc::new(count_types(&file))
        })
        .await
        .map_err(|_| ConsoleError::ShuttingDown)?;
        *cached = Some(CountsAt {
            epoch,
            head_seq: file.head_seq,
            counts: counts.clone(),
        });
        Ok((file.head_seq, counts))
    }

    /// `/api/policies`: the ledger's file as one JSON document, streamed in chunks.
    async fn policies(&self) -> Result<Response<HttpBody>, ConsoleError> {
        let file = self.ledger()?.file().await?;
        let stream = async_stream::stream! {
            yield Ok::<_, Infallible>(Frame::data(Bytes::from(format!(
                "{{\"head_seq\":{},\"policy_count\":{},\"digest\":\"{}\",\"policies\":[",
                file.head_seq, file.policy_count, file.digest
            ))));
            for chunk in policy_chunks(&file) {
                yield Ok(Frame::data(chunk));
            }
            yield Ok(Frame::data(Bytes::from_static(b"]}")));
        };
        let mut response = Response::new(StreamBody::new(stream).boxed_unsync());
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        Ok(response)
    }

    /// `/api/subscribers`: `ListSubscribers`' entries, the most behind first.
    fn subscribers(&self) -> Result<Response<HttpBody>, ConsoleError> {
        let mut subscribers = self.ledger()?.subscribers().list().subscribers;
        subscribers.sort_by(|a, b| {
            b.lag
                .cmp(&a.lag)
                .then_with(|| a.node_name.cmp(&b.node_name))
        });
        Ok(json_response(
            serde_json::to_string(&subscribers).unwrap_or_else(|_| "[]".into()),
        ))
    }

    /// `/api/feed`: the changes after `Last-Event-ID` (a reconnecting `EventSource`), or after
    /// `?after=SEQ`, or from the head on, as server-sent events.
    fn feed(&self, request: &Request<Incoming>) -> Result<Response<HttpBody>, ConsoleError> {
        let ledger = self.ledger()?;
        let after = request
            .headers()
            .get("last-event-id")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .or_else(|| query_value(request.uri().query(), "after").and_then(|v| v.parse().ok()))
            .unwrap_or_else(|| ledger.feed().head());
        let client = request.extensions().get::<Peer>().map(|peer| peer.0.ip());
        let permit = self.0.options.streams.admit(client)?;
        let events = ledger.subscribe(after, client);
        drop(ledger);
        let stream = async_stream::stream! {
            // The stream's place, for as long as it is open.
            let _permit = permit;
            yield Ok::<_, Infallible>(Frame::data(Bytes::from(format!(
                "retry: 1000\n: ledger feed after seq {after}\n\n"
            ))));
            tokio::pin!(events);
            let mut keep_alive = tokio::time::interval(KEEP_ALIVE);
            keep_alive.tick().await;
            loop {
                // No yield inside the select.
                let next = tokio::select! {
                    event = events.next() => Some(event),
                    _ = keep_alive.tick() => None,
                };
                let Some(event) = next else {
                    yield Ok(Frame::data(Bytes::from_static(b": keep-alive\n\n")));
                    continue;
                };
                let Some(event) = event else { break };
                match event {
                    Ok(event) => yield Ok(Frame::data(Bytes::from(sse_event(&event)))),
                    Err(e) => {
                        let data = serde_json::json!({ "message": e.to_string() });
                        yield Ok(Frame::data(Bytes::from(format!("event: error\ndata: {data}\n\n"))));
                        break;
                    }
                }
            }
        };
        let mut response = Response::new(StreamBody::new(stream).boxed_unsync());
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        Ok(response)
    }
}

impl Routes for Console {
    fn route(&self, request: Request<Incoming>) -> RouteFuture {
        let console = self.clone();
        Box::pin(async move { console.respond(request).await })
    }
}

/// One subscription event as server-sent event text. A change and `caught_up` carry their seq
/// as the event's id, which a reconnecting `EventSource` sends back (`Last-Event-ID`); a
/// subscriber too far behind (or at 0) gets `reset`, the snapshot's policies and `caught_up`.
fn sse_event(event: &Event) -> String {
    let policy_data = |seq: u64, op: &str, policy: &ledger_storage::StoredPolicy| {
        format!(
            "{{\"seq\":{seq},\"op\":\"{op}\",\"id\":{},\"type\":{},\"policy\":{}}}",
            json_string(&policy.id),
            json_string(&policy.policy_type),
            policy.json
        )
    };
    match event {
        Event::Change(change) => {
            let data = match &change.kind {
                ChangeKind::Inserted(policy) => policy_data(change.seq, "insert", policy),
                ChangeKind::Deleted { id } => format!(
                    "{{\"seq\":{},\"op\":\"delete\",\"id\":{}}}",
                    change.seq,
                    json_string(id)
                ),
            };
            format!("id: {}\nevent: change\ndata: {data}\n\n", change.seq)
        }
        Event::CaughtUp { seq } => {
            format!("id: {seq}\nevent: caught_up\ndata: {{\"seq\":{seq}}}\n\n")
        }
        Event::Progress { head_seq } => {
            format!("event: progress\ndata: {{\"head_seq\":{head_seq}}}\n\n")
        }
        Event::Reset {
            snapshot_seq,
            policy_count,
        } => format!(
            "event: reset\ndata: {{\"seq\":{snapshot_seq},\"policy_count\":{policy_count}}}\n\n"
        ),
        Event::Snapshot(policy) => format!(
            "event: snapshot\ndata: {}\n\n",
            policy_data(policy.seq, "snapshot", policy)
        ),
    }
}

fn json_string(text: &str) -> String {
    serde_json::Value::String(text.to_string()).to_string()
}

/// The file's lines (one policy each) as the elements of a JSON array: chunks of about
/// [`POLICIES_CHUNK`] bytes, each cut after a line, line breaks turned into commas.
fn policy_chunks(file: &LedgerFile) -> impl Iterator<Item = Bytes> + '_ {
    let bytes = file.bytes.as_slice();
    let mut start = 0;
    std::iter::from_fn(move || {
        if start >= bytes.len() {
            return None;
        }
        let mut end = (start + POLICIES_CHUNK).min(bytes.len());
        while end < bytes.len() && bytes[end - 1] != b'\n' {
            end += 1;
        }
        let first = start == 0;
        let mut chunk = Vec::with_capacity(end - start + 1);
        if !first {
            chunk.push(b',');
        }
        chunk.extend_from_slice(&bytes[start..end]);
        start = end;
        // Every line break but the file's last separates two policies.
        if chunk.last() == Some(&b'\n') {
            chunk.pop();
        }
        for byte in chunk.iter_mut() {
            if *byte == b'\n' {
                *byte = b',';
            }
        }
        Some(Bytes::from(chunk))
    })
}

/// How many policies of each type the file holds (the type is a line's one root key).
fn count_types(file: &LedgerFile) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for line in file.bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let root: Result<BTreeMap<String, serde::de::IgnoredAny>, _> = serde_json::from_slice(line);
        if let Ok(root) = root
            && let Some(policy_type) = root.into_keys().next()
        {
            *counts.entry(policy_type).or_insert(0) += 1;
        }
    }
    counts
}

fn text_response(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<HttpBody> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // Everything the page loads comes from this master: no CDN, no inline script.
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'",
        ),
    );
    response
}

fn json_response(body: String) -> Response<HttpBody> {
    text_response(StatusCode::OK, "application/json", body)
}

/// `303 See Other` to `/`, setting the token's cookie (HttpOnly: the page's script never sees
/// it; SameSite=Strict: no other site's page sends it).
fn token_cookie_redirect(token: &str) -> Response<HttpBody> {
    let mut response = text_response(
        StatusCode::SEE_OTHER,
        "text/plain; charset=utf-8",
        "token accepted: see /\n",
    );
    let headers = response.headers_mut();
    headers.insert(header::LOCATION, HeaderValue::from_static("/"));
    if let Ok(cookie) = HeaderValue::from_str(&format!(
        "{TOKEN_COOKIE}={}; Path=/; HttpOnly; SameSite=Strict",
        percent_encode(token)
    )) {
        headers.insert(header::SET_COOKIE, cookie);
    }
    response
}

/// The token in the `ledger_token` cookie, if any.
fn cookie_token(headers: &http::HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == TOKEN_COOKIE)
        .and_then(|(_, value)| percent_decode(value))
}

/// The value of `name` in a query string (percent-decoded, `+` as a space).
fn query_value(query: Option<&str>, name: &str) -> Option<String> {
    query?
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(key, _)| *key == name)
        .and_then(|(_, value)| percent_decode(&value.replace('+', " ")))
}

fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(lines: &[&str]) -> LedgerFile {
        let mut bytes = Vec::new();
        for line in lines {
            bytes.extend_from_slice(line.as_bytes());
            bytes.push(b'\n');
        }
        LedgerFile {
            head_seq: lines.len() as u64,
            policy_count: lines.len() as u64,
            digest: String::new(),
            bytes,
        }
    }

    #[test]
    fn the_policies_are_one_json_array_in_chunks_cut_after_lines() {
        let long = format!(r#"{{"operator": {{"name": "{}"}}}}"#, "x".repeat(100_000));
        let lines: Vec<String> = (0..9)
            .map(|n| match n % 3 {
                0 => long.clone(),
                1 => format!(r#"{{"cluster": {{"n": {n}}}}}"#),
                _ => format!(r#"{{"table": {{"text": "a\nb {n}"}}}}"#),
            })
            .collect();
        let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
        let file = file(&lines);
        let chunks: Vec<Bytes> = policy_chunks(&file).collect();
        assert!(chunks.len() > 1, "{} chunks", chunks.len());
        let mut text = b"[".to_vec();
        for chunk in &chunks {
            text.extend_from_slice(chunk);
        }
        text.push(b']');
        let array: Vec<serde_json::Value> = serde_json::from_slice(&text).unwrap();
        assert_eq!(array.len(), 9);
        assert_eq!(array[2]["table"]["text"], "a\nb 2");
        assert_eq!(policy_chunks(&file_empty()).count(), 0);
    }

    fn file_empty() -> LedgerFile {
        file(&[])
    }

    #[test]
    fn types_are_counted_by_root_key() {
        let counts = count_types(&file(&[
            r#"{"operator": {"name": "a"}}"#,
            r#"{"operator": {"name": "b"}}"#,
            r#"{"cluster": {"name": "c"}}"#,
        ]));
        assert_eq!(counts.get("operator"), Some(&2));
        assert_eq!(counts.get("cluster"), Some(&1));
    }

    #[test]
    fn the_token_comes_from_the_cookie_or_the_query() {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("a=b; ledger_token=s%2F3cret; c=d"),
        );
        assert_eq!(cookie_token(&headers).as_deref(), Some("s/3cret"));
        assert_eq!(
            query_value(Some("x=1&token=s%2F3cret"), "token").as_deref(),
            Some("s/3cret")
        );
        assert_eq!(query_value(Some("x=1"), "token"), None);
        assert_eq!(
            percent_decode(&percent_encode("a b/c;d=é")).as_deref(),
            Some("a b/c;d=é")
        );
    }
}
