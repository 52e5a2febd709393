//! The follower's `LISTEN` connection, opened with the database URL's TLS settings meaning what
//! they mean to libpq, which opens every other connection of the master (diesel's).
//!
//! tokio-postgres parses the rest of the URL (hosts, ports, user, `target_session_attrs`, ...)
//! but knows only `sslmode=disable|prefer|require`, refuses `verify-ca`, `verify-full` and every
//! certificate parameter, and tries one mode on every host. So the TLS parameters are taken out
//! of the URL here (with their `PGSSL*` environment variables and `~/.postgresql/` files as
//! libpq's defaults), and the hosts are tried one by one, each with the modes libpq tries, in
//! libpq's order. TLS is rustls, its certificate checks set as libpq sets OpenSSL's:
//!
//! | `sslmode` | tries | server certificate |
//! | --- | --- | --- |
//! | `disable` | plaintext | - |
//! | `allow` | plaintext, then TLS | checked against the root certificates if there are any |
//! | `prefer` (default) | TLS (plaintext if the server has none), then plaintext | as `allow` |
//! | `require` | TLS | as `allow`: a root certificate file makes it `verify-ca` |
//! | `verify-ca` | TLS | chain to `sslrootcert` (default `~/.postgresql/root.crt`), which must exist |
//! | `verify-full` | TLS | as `verify-ca`, and the certificate names the host |
//!
//! Unix-domain sockets are always plaintext, as libpq ignores `sslmode` there.
//!
//! The connection's timeouts are set here too, from [`PgTimeouts`] (the URL's values in
//! libpq's units, or the master's defaults), never from the URL as tokio-postgres reads it: it
//! reads `tcp_user_timeout` in seconds where libpq reads milliseconds, and refuses libpq's
//! `keepalives_count`. Its `connect_timeout` covers only the TCP connect, so each host's whole
//! attempt (start-up and authentication included) is bounded here: a frozen server accepts TCP
//! connections and never answers.

mod tls;

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ledger_storage::PgTimeouts;

use tokio_postgres::config::{Host, LoadBalanceHosts, SslMode as PgSslMode};
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{Client, Config, Connection, Socket};
use tokio_postgres_rustls::MakeRustlsConnect;

use tls::{TLS_PARAMETERS, TlsSettings, home_dir, plaintext_connector};

/// The TLS stream of a listening connection (plaintext connections have the same type).
pub type TlsStream = <MakeRustlsConnect as MakeTlsConnect<Socket>>::Stream;

/// Why the listening connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// The URL cannot be used by this connection, whatever happens to the server: logged once,
    /// not retried.
    #[error("{0}")]
    Unsupported(String),
    /// A file named by the TLS settings (or one of libpq's defaults) cannot be used.
    #[error("{what} {path}: {reason}")]
    File {
        /// Which file: `root certificate file`, `client key file`, ...
        what: &'static str,
        /// Where it is.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// rustls refused the TLS settings.
    #[error("TLS settings: {0}")]
    Tls(#[from] rustls::Error),
    /// `verify-full` and a host given only as `hostaddr`: there is no name to check the server's
    /// certificate against (libpq refuses the same).
    #[error("sslmode=verify-full needs a host name, and host {0} is given only as hostaddr")]
    NoHostName(IpAddr),
    /// The TLS settings could not be made into a TLS configuration (a file missing or
    /// unusable): for this attempt, as libpq reads the files on every connection.
    #[error("{0}")]
    Setup(String),
    /// The server refused, or could not be reached.
    #[error("{}", describe_postgres_error(.0))]
    Connect(tokio_postgres::Error),
    /// The host did not finish the connection's start-up in time.
    #[error("no answer within {0:?} (connect_timeout)")]
    TimedOut(Duration),
    /// Every attempt failed: each host with each mode tried, and why.
    #[error("{}", describe(.0))]
    Failed(Vec<(String, ListenError)>),
}

/// A tokio-postgres error with its causes: its own text is only the kind (`db error`, `error
/// performing TLS handshake`), the server's message or the certificate problem is the cause's.
pub fn describe_postgres_error(error: &tokio_postgres::Error) -> String {
    let mut text = error.to_string();
    let mut cause = std::error::Error::source(error);
    while let Some(e) = cause {
        let more = e.to_string();
        // Some causes repeat the text of the one they wrap.
        if !text.ends_with(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = e.source();
    }
    text
}

/// `HOST:PORT how: why; ...`.
fn describe(failures: &[(String, ListenError)]) -> String {
    failures
        .iter()
        .map(|(attempt, error)| format!("{attempt}: {error}"))
        .collect::<Vec<_>>()
        .join("; ")
}

impl ListenError {
    /// Whether retrying cannot help until the URL is changed.
    pub fn is_permanent(&self) -> bool {
        matches!(self, ListenError::Unsupported(_))
    }
}

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Plaintext only.
    Disable,
    /// Plaintext, then TLS if plaintext fails.
    Allow,
    /// TLS (plaintext if the server does not offer it), then plaintext if TLS fails.
    Prefer,
    /// TLS only.
    Require,
    /// TLS only, the server's certificate chained to a root certificate.
    VerifyCa,
    /// TLS only, the server's certificate chained to a root certificate and naming the host.
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<SslMode, ListenError> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(ListenError::Unsupported(format!(
                    "invalid sslmode value: {other:?}"
                )));
            }
        })
    }

    fn verifies(self) -> bool {
        matches!(self, SslMode::VerifyCa | SslMode::VerifyFull)
    }
}

/// The `application_name` of the listening connection when neither the URL nor `PGAPPNAME`
/// gives one (libpq's `fallback_application_name`, which the URL may also give): it tells the
/// connection apart from the pool's in `pg_stat_activity`.
pub const LISTEN_APPLICATION_NAME: &str = "ledger-master listen";

/// The listening connection's settings: where to connect and how, from the database URL.
#[derive(Clone)]
pub struct ListenTarget {
    /// Everything but TLS, parsed by tokio-postgres.
    base: Config,
    tls: TlsSettings,
    /// The longest one host's attempt may take.
    connect_timeout: Duration,
    /// The host (from 1, in the URL's order) that took the last connection, tried first by the
    /// next: after a failover the old primary would otherwise cost every reconnect its
    /// `connect_timeout`. 0 when none is known.
    last_host: Arc<AtomicUsize>,
}

impl std::fmt::Debug for ListenTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // tokio-postgres's Debug hides the password.
        f.debug_struct("ListenTarget")
            .field("base", &self.base)
            .field("tls", &self.tls)
            .finish()
    }
}

/// One host of the URL, with its port.
#[derive(Debug, Clone)]
struct HostTarget {
    host: Option<Host>,
    hostaddr: Option<IpAddr>,
    port: u16,
}

/// An open connection, and the mode that opened it.
pub struct Listening {
    /// The client: the connection closes when it is dropped.
    pub client: Client,
    /// The connection, to be polled for its messages (notifications among them).
    pub connection: Connection<Socket, TlsStream>,
    /// The `sslmode` that connected: `Disable` for plaintext, `Prefer` for TLS unless the
    /// server offered none, `Require` for TLS.
    pub attempt: PgSslMode,
}

impl ListenTarget {
    /// Reads `url` (a `postgres://` or `postgresql://` URL) as libpq would, with the process's
    /// `PGSSL*` environment variables and home directory for what the URL does not say.
    /// `timeouts` are the connection's (the URL's timeout parameters are not read here).
    pub fn parse(url: &str, timeouts: PgTimeouts) -> Result<ListenTarget, ListenError> {
        Self::parse_with(url, timeouts, |name| std::env::var(name).ok(), home_dir())
    }

    /// [`ListenTarget::parse`] with the environment and the home directory given.
    fn parse_with(
        url: &str,
        timeouts: PgTimeouts,
        env: impl Fn(&str) -> Option<String>,
        home: Option<PathBuf>,
    ) -> Result<ListenTarget, ListenError> {
        let (head, query) = url.split_once('?').unwrap_or((url, ""));
        let mut kept = Vec::new();
        let mut given: Vec<(&str, String)> = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let Some((key, value)) = pair.split_once('=') else {
                // tokio-postgres says what is wrong with it.
                kept.push(pair);
                continue;
            };
            let key_decoded = percent_decode(key)?;
            if PgTimeouts::PARAMETERS.contains(&key_decoded.as_str()) {
                // In `timeouts`, in libpq's units.
                continue;
            }
            match TLS_PARAMETERS.iter().find(|(name, _)| *name == key_decoded) {
                Some((name, _)) => {
                    given.retain(|(n, _)| n != name);
                    given.push((name, percent_decode(value)?));
                }
                None => kept.push(pair),
            }
        }
        // As libpq: the URL's value, else the environment's, else the default.
        let setting = |name: &str| -> Option<String> {
            given
                .iter()
                .rev()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.clone())
                .or_else(|| {
                    TLS_PARAMETERS
                        .iter()
                        .find(|(n, _)| *n == name)
                        .and_then(|(_, var)| var.and_then(&env))
                })
                .filter(|v| !v.is_empty())
        };
        let rest = if kept.is_empty() {
            head.to_string()
        } else {
            format!("{head}?{}", kept.join("&"))
        };
        let mut base: Config = rest.parse().map_err(|e: tokio_postgres::Error| {
            ListenError::Unsupported(format!("the database URL: {e}"))
        })?;
        if base.get_application_name().is_none() {
            let name = env("PGAPPNAME")
                .or_else(|| setting("fallback_application_name"))
                .unwrap_or_else(|| LISTEN_APPLICATION_NAME.to_string());
            base.application_name(name);
        }
        base.connect_timeout(timeouts.connect)
            .keepalives(timeouts.keepalives)
            .keepalives_idle(timeouts.keepalives_idle)
            .keepalives_interval(timeouts.keepalives_interval)
            .keepalives_retries(timeouts.keepalives_count)
            .tcp_user_timeout(timeouts.tcp_user_timeout);
        let tls = TlsSettings::read(&setting, home.as_deref())?;
        let target = ListenTarget {
            base,
            tls,
            connect_timeout: timeouts.connect,
            last_host: Arc::new(AtomicUsize::new(0)),
        };
        target.hosts()?;
        Ok(target)
    }

    /// The URL's hosts in the order they are tried, as tokio-postgres pairs them.
    fn hosts(&self) -> Result<Vec<HostTarget>, ListenError> {
        let hosts = self.base.get_hosts();
        let addrs = self.base.get_hostaddrs();
        let ports = self.base.get_ports();
        let count = hosts.len().max(addrs.len());
        if count == 0 {
            return Err(ListenError::Unsupported(
                "the database URL names no host".into(),
            ));
        }
        if !hosts.is_empty() && !addrs.is_empty() && hosts.len() != addrs.len() {
            return Err(ListenError::Unsupported(format!(
                "the database URL names {} hosts and {} hostaddrs",
                hosts.len(),
                addrs.len()
            )));
        }
        if ports.len() > 1 && ports.len() != count {
            return Err(ListenError::Unsupported(format!(
                "the database URL names {count} hosts and {} ports",
                ports.len()
            )));
        }
        let mut targets: Vec<HostTarget> = (0..count)
            .map(|i| HostTarget {
                host: hosts.get(i).cloned(),
                hostaddr: addrs.get(i).copied(),
                port: ports.get(i).or(ports.first()).copied().unwrap_or(5432),
            })
            .collect();
        if self.base.get_load_balance_hosts() == LoadBalanceHosts::Random {
            fastrand::shuffle(&mut targets);
        }
        Ok(targets)
    }

    /// The modes libpq tries on `host`, in its order.
    fn attempts(&self, host: &HostTarget) -> &'static [PgSslMode] {
        if matches!(host.host, Some(Host::Unix(_))) && host.hostaddr.is_none() {
            return &[PgSslMode::Disable];
        }
        match self.tls.mode {
            SslMode::Disable => &[PgSslMode::Disable],
            SslMode::Allow => &[PgSslMode::Disable, PgSslMode::Require],
            SslMode::Prefer => &[PgSslMode::Prefer, PgSslMode::Disable],
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => &[PgSslMode::Require],
        }
    }

    /// tokio-postgres's settings for one host and one mode: the URL's others unchanged.
    fn config_for(&self, host: &HostTarget, mode: PgSslMode) -> Config {
        let mut config = copy_settings(&self.base);
        match &host.host {
            Some(Host::Tcp(name)) => {
                config.host(name);
            }
            Some(Host::Unix(path)) => {
                config.host_path(path);
            }
            // The address is the name TLS knows the server by when no name is given: libpq
            // then sends no SNI and checks no name (verify-full is refused before this).
            None => {
                if let Some(addr) = host.hostaddr {
                    config.host(addr.to_string());
                }
            }
        }
        if let Some(addr) = host.hostaddr {
            config.hostaddr(addr);
        }
        config.port(host.port).ssl_mode(mode);
        config
    }

    /// The `sslmode` the URL asks for (after the environment and the defaults).
    pub fn ssl_mode(&self) -> SslMode {
        self.tls.mode
    }

    /// Opens a connection to the first host that accepts one, trying each host with the modes
    /// libpq would try; the certificate files are read anew, as libpq reads them on every
    /// connection.
    pub async fn connect(&self) -> Result<Listening, ListenError> {
        // Made on the first TLS attempt; a setup that fails is an attempt that fails (`prefer`
        // then tries plaintext, as libpq does).
        let mut tls: Option<Result<MakeRustlsConnect, String>> = None;
        let mut failures = Vec::new();
        let mut hosts: Vec<(usize, HostTarget)> = self.hosts()?.into_iter().enumerate().collect();
        // With `load_balance_hosts=random` the order is new at every attempt, as libpq's.
        let ordered = self.base.get_load_balance_hosts() != LoadBalanceHosts::Random;
        if ordered
            && let Some(last) = self.last_host.load(Ordering::Relaxed).checked_sub(1)
            && let Some(at) = hosts.iter().position(|(i, _)| *i == last)
        {
            let preferred = hosts.remove(at);
            hosts.insert(0, preferred);
        }
        for (index, host) in hosts {
            for &mode in self.attempts(&host) {
                let label = host.label(mode);
                let connector = if mode == PgSslMode::Disable {
                    // Never asked for a handshake, but tokio-postgres needs one all the same.
                    plaintext_connector()
                } else if self.tls.mode == SslMode::VerifyFull && host.host.is_none() {
                    let addr = host.hostaddr.expect("a host without a name has an address");
                    failures.push((label, ListenError::NoHostName(addr)));
                    continue;
                } else {
                    let made = tls.get_or_insert_with(|| {
                        self.tls
                            .client_config()
                            .map(MakeRustlsConnect::new)
                            .map_err(|e| e.to_string())
                    });
                    match made {
                        Ok(connector) => connector.clone(),
                        Err(e) => {
                            failures.push((label, ListenError::Setup(e.clone())));
                            continue;
                        }
                    }
                };
                let config = self.config_for(&host, mode);
                match tokio::time::timeout(self.connect_timeout, config.connect(connector)).await {
                    Ok(Ok((client, connection))) => {
                        if ordered {
                            self.last_host.store(index + 1, Ordering::Relaxed);
                        }
                        return Ok(Listening {
                            client,
                            connection,
                            attempt: mode,
                        });
                    }
                    Ok(Err(e)) => failures.push((label, ListenError::Connect(e))),
                    Err(_) => {
                        // As libpq: a host that does not answer is not tried again in another
                        // mode; the next host is.
                        failures.push((label, ListenError::TimedOut(self.connect_timeout)));
                        break;
                    }
                }
            }
        }
        Err(ListenError::Failed(failures))
    }
}

impl HostTarget {
    /// `HOST:PORT with TLS` (or `in plaintext`), for the errors.
    fn label(&self, mode: PgSslMode) -> String {
        let host = match (&self.host, self.hostaddr) {
            (Some(Host::Tcp(name)), _) => name.clone(),
            (Some(Host::Unix(path)), _) => path.display().to_string(),
            (None, Some(addr)) => addr.to_string(),
            (None, None) => String::new(),
        };
        let how = match mode {
            PgSslMode::Disable => "in plaintext",
            PgSslMode::Prefer => "with TLS if offered",
            _ => "with TLS",
        };
        format!("{host}:{} {how}", self.port)
    }
}

/// A new tokio-postgres configuration with every setting of `base` but its hosts, ports and
/// `sslmode`.
fn copy_settings(base: &Config) -> Config {
    let mut config = Config::new();
    if let Some(user) = base.get_user() {
        config.user(user);
    }
    if let Some(password) = base.get_password() {
        config.password(password);
    }
    if let Some(dbname) = base.get_dbname() {
        config.dbname(dbname);
    }
    if let Some(options) = base.get_options() {
        config.options(options);
    }
    if let Some(name) = base.get_application_name() {
        config.application_name(name);
    }
    if let Some(timeout) = base.get_connect_timeout() {
        config.connect_timeout(*timeout);
    }
    if let Some(timeout) = base.get_tcp_user_timeout() {
        config.tcp_user_timeout(*timeout);
    }
    if let Some(interval) = base.get_keepalives_interval() {
        config.keepalives_interval(interval);
    }
    if let Some(retries) = base.get_keepalives_retries() {
        config.keepalives_retries(retries);
    }
    config
        .ssl_negotiation(base.get_ssl_negotiation())
        .keepalives(base.get_keepalives())
        .keepalives_idle(base.get_keepalives_idle())
        .target_session_attrs(base.get_target_session_attrs())
        .channel_binding(base.get_channel_binding())
        .load_balance_hosts(base.get_load_balance_hosts());
    config
}

/// `%XX` sequences decoded, as libpq decodes URL parameters.
fn percent_decode(text: &str) -> Result<String, ListenError> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| {
                    ListenError::Unsupported("invalid percent-encoding in the database URL".into())
                })?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out)
        .map_err(|_| ListenError::Unsupported("a URL parameter is not UTF-8".into()))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::tls::RootCert;
    use super::*;

    fn parse(url: &str, env: &[(&str, &str)]) -> Result<ListenTarget, ListenError> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        ListenTarget::parse_with(
            url,
            PgTimeouts::DEFAULT,
            move |name| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()),
            Some(PathBuf::from("/home/ledger")),
        )
    }

    #[test]
    fn sslmode_comes_from_the_url_then_the_environment_then_prefer() {
        let mode = |url: &str, env: &[(&str, &str)]| parse(url, env).unwrap().ssl_mode();
        assert_eq!(mode("postgres://u@h/db", &[]), SslMode::Prefer);
        assert_eq!(
            mode("postgres://u@h/db", &[("PGSSLMODE", "require")]),
            SslMode::Require
        );
        assert_eq!(
            mode(
                "postgres://u@h/db?sslmode=verify-ca",
                &[("PGSSLMODE", "disable")]
            ),
            SslMode::VerifyCa
        );
        for (value, expected) in [
            ("disable", SslMode::Disable),
            ("allow", SslMode::Allow),
            ("prefer", SslMode::Prefer),
            ("require", SslMode::Require),
            ("verify-ca", SslMode::VerifyCa),
            ("verify-full", SslMode::VerifyFull),
        ] {
            assert_eq!(
                mode(&format!("postgres://u@h/db?sslmode={value}"), &[]),
                expected
            );
        }
        let error = parse("postgres://u@h/db?sslmode=always", &[]).unwrap_err();
        assert!(error.is_permanent(), "{error}");
    }

    #[test]
    fn system_roots_default_to_verify_full_and_refuse_weaker_modes() {
        let target = parse("postgres://u@h/db?sslrootcert=system", &[]).unwrap();
        assert_eq!(target.ssl_mode(), SslMode::VerifyFull);
        let error = parse("postgres://u@h/db?sslrootcert=system&sslmode=require", &[]).unwrap_err();
        assert!(error.to_string().contains("verify-full"), "{error}");
    }

    #[test]
    fn tls_parameters_are_taken_out_and_the_rest_is_tokio_postgres_s() {
        let target = parse(
            "postgresql://u:pw@a:5433,b:5434/db?sslmode=verify-full&sslrootcert=%2Fetc%2Fca%20x.pem\
             &target_session_attrs=read-write&application_name=ledger&sslsni=0&connect_timeout=3",
            &[],
        )
        .unwrap();
        assert_eq!(
            target.tls.root_cert,
            RootCert::File(PathBuf::from("/etc/ca x.pem"))
        );
        assert!(!target.tls.sni);
        assert_eq!(target.base.get_user(), Some("u"));
        assert_eq!(target.base.get_dbname(), Some("db"));
        assert_eq!(
            target.base.get_target_session_attrs(),
            tokio_postgres::config::TargetSessionAttrs::ReadWrite
        );
        let hosts = target.hosts().unwrap();
        let named: Vec<String> = hosts.iter().map(|h| h.label(PgSslMode::Require)).collect();
        assert_eq!(named, ["a:5433 with TLS", "b:5434 with TLS"]);
        // Each host is tried with the URL's other settings unchanged.
        let one = target.config_for(&hosts[1], PgSslMode::Require);
        assert_eq!(one.get_hosts(), [Host::Tcp("b".into())]);
        assert_eq!(one.get_ports(), [5434]);
        assert_eq!(one.get_password(), Some(&b"pw"[..]));
        assert_eq!(
            one.get_target_session_attrs(),
            tokio_postgres::config::TargetSessionAttrs::ReadWrite
        );
        assert_eq!(one.get_connect_timeout(), Some(&Duration::from_secs(3)));
        assert_eq!(one.get_application_name(), Some("ledger"));
        // Without one, the listening connection has a name of its own.
        let unnamed = parse("postgres://u@h/db", &[]).unwrap();
        assert_eq!(
            unnamed.base.get_application_name(),
            Some(LISTEN_APPLICATION_NAME)
        );
        // An unknown parameter is still refused, by tokio-postgres, for good.
        let error = parse("postgres://u@h/db?gssencmode=require", &[]).unwrap_err();
        assert!(error.is_permanent(), "{error}");
    }

    /// Every setting tokio-postgres parses reaches the one-host configurations: their Debug
    /// (which lists every field) equals the whole URL's for a URL of one host.
    #[test]
    fn a_one_host_configuration_keeps_every_setting() {
        let url = "postgres://u:pw@h:5439/db?options=-c%20x%3D1&application_name=a\
                   &connect_timeout=7&tcp_user_timeout=8&keepalives=0&keepalives_idle=9\
                   &keepalives_interval=10&keepalives_retries=11&target_session_attrs=read-only\
                   &channel_binding=require&load_balance_hosts=random&sslnegotiation=direct\
                   &hostaddr=127.0.0.1&sslmode=require";
        let target = parse(url, &[]).unwrap();
        let hosts = target.hosts().unwrap();
        let one = target.config_for(&hosts[0], PgSslMode::Require);
        let mut whole = target.base.clone();
        whole.ssl_mode(PgSslMode::Require);
        assert_eq!(format!("{one:?}"), format!("{whole:?}"));
    }

    /// The URL's timeouts reach the listening connection in libpq's units, and tokio-postgres
    /// never reads them itself (it would take `tcp_user_timeout=2500` for 2,500 seconds and
    /// refuse `keepalives_count`).
    #[test]
    fn timeouts_are_libpq_s_and_set_in_code() {
        let url = "postgres://u@a:5433,b:5434/db?target_session_attrs=read-write\
                   &tcp_user_timeout=2500&keepalives_count=4&connect_timeout=6";
        let database: ledger_storage::DatabaseUrl = url.parse().unwrap();
        let timeouts = database.pg_timeouts().unwrap();
        let target = ListenTarget::parse_with(url, timeouts, |_| None, None).unwrap();
        assert_eq!(target.connect_timeout, Duration::from_secs(6));
        let one = target.config_for(&target.hosts().unwrap()[1], PgSslMode::Disable);
        assert_eq!(
            one.get_tcp_user_timeout(),
            Some(&Duration::from_millis(2500))
        );
        assert_eq!(one.get_keepalives_retries(), Some(4));
        assert_eq!(one.get_connect_timeout(), Some(&Duration::from_secs(6)));
        assert!(one.get_keepalives());
        // Nothing said: the master's defaults.
        let plain =
            ListenTarget::parse_with("postgres://u@a/db", PgTimeouts::DEFAULT, |_| None, None)
                .unwrap();
        assert_eq!(
            plain.base.get_tcp_user_timeout(),
            Some(&PgTimeouts::DEFAULT.tcp_user_timeout)
        );
        assert_eq!(
            plain.base.get_keepalives_idle(),
            PgTimeouts::DEFAULT.keepalives_idle
        );
    }

    #[test]
    fn each_mode_tries_what_libpq_tries() {
        let tried = |mode: &str, host: &str| {
            let target = parse(&format!("postgres://u@{host}/db?sslmode={mode}"), &[]).unwrap();
            let hosts = target.hosts().unwrap();
            target.attempts(&hosts[0]).to_vec()
        };
        use PgSslMode::{Disable, Prefer, Require};
        assert_eq!(tried("disable", "h"), [Disable]);
        assert_eq!(tried("allow", "h"), [Disable, Require]);
        assert_eq!(tried("prefer", "h"), [Prefer, Disable]);
        assert_eq!(tried("require", "h"), [Require]);
        assert_eq!(tried("verify-ca", "h"), [Require]);
        assert_eq!(tried("verify-full", "h"), [Require]);
        // libpq ignores sslmode on a Unix-domain socket.
        assert_eq!(tried("verify-full", "%2Frun%2Fpostgresql"), [Disable]);
    }

    #[test]
    fn root_certificates_as_libpq_looks_for_them() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let settings = |url: &str| parse(url, &[]).unwrap().tls;
        // Below verify-ca, a missing file means no check; the default is under the home.
        let require = settings(&format!(
            "postgres://u@h/db?sslmode=require&sslrootcert={}",
            missing.display()
        ));
        assert!(require.root_certificates().unwrap().is_none());
        assert_eq!(
            settings("postgres://u@h/db").root_cert,
            RootCert::File(PathBuf::from("/home/ledger/.postgresql/root.crt"))
        );
        // verify-ca and verify-full need it.
        for mode in ["verify-ca", "verify-full"] {
            let verify = settings(&format!(
                "postgres://u@h/db?sslmode={mode}&sslrootcert={}",
                missing.display()
            ));
            let error = verify.client_config().unwrap_err();
            assert!(error.to_string().contains("missing.pem"), "{error}");
        }
        // A file that holds no certificate is an error, not "no check".
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let error = settings(&format!(
            "postgres://u@h/db?sslmode=require&sslrootcert={}",
            empty.display()
        ))
        .client_config()
        .unwrap_err();
        assert!(error.to_string().contains("no PEM certificate"), "{error}");
    }

    #[test]
    fn protocol_versions_are_libpq_s_within_what_rustls_speaks() {
        let versions = |query: &str| {
            parse(&format!("postgres://u@h/db?{query}"), &[])
                .map(|t| t.tls.versions.iter().map(|v| v.version).collect::<Vec<_>>())
        };
        use rustls::ProtocolVersion::{TLSv1_2, TLSv1_3};
        assert_eq!(versions("").unwrap(), [TLSv1_2, TLSv1_3]);
        assert_eq!(
            versions("ssl_min_protocol_version=TLSv1.3").unwrap(),
            [TLSv1_3]
        );
        assert_eq!(
            versions("ssl_max_protocol_version=TLSv1.2").unwrap(),
            [TLSv1_2]
        );
        assert!(versions("ssl_max_protocol_version=TLSv1.1").is_err());
        assert!(versions("ssl_min_protocol_version=SSLv3").is_err());
    }

    #[test]
    fn verify_full_needs_a_host_name() {
        let target = parse(
            "postgres://u@/db?hostaddr=127.0.0.1&port=1&sslmode=verify-full",
            &[],
        )
        .unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let error = runtime.block_on(target.connect()).err().unwrap();
        assert!(error.to_string().contains("needs a host name"), "{error}");
    }
}
