//! Where the ledger lives: [`DatabaseUrl`] parsed from `--database-url` (and its command-line
//! parser, which never prints a refused URL's secrets), [`redact_secrets`] for anything that may
//! show one, and opening one connection to it, set up as every connection of the ledger must be.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::prelude::*;

use super::AnyConnection;

/// Run on every SQLite connection.
///
/// - `synchronous = FULL` makes every commit fsync the WAL: an acknowledged insert survives a
///   crash of the machine, not only of the process.
/// - The busy timeout lets a reader wait for the writer instead of failing.
/// - `temp_store = MEMORY`: statement journals and sorts stay in memory instead of temp files
///   opened, written and unlinked during writes.
/// - `wal_autocheckpoint` ([`SQLITE_WAL_CHECKPOINT_BYTES`], set by [`DatabaseUrl::connect`]).
const SQLITE_CONNECTION_PRAGMAS: &str = "PRAGMA busy_timeout = 10000; \
     PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON; PRAGMA temp_store = MEMORY;";

/// The writer copies the WAL into the database once it holds this many bytes of pages, inside a
/// commit, then syncs the database. At SQLite's default (1,000 pages, 4 MiB) that happened every
/// ~36 commits under 64 clients and cost ~25% of the writer's time (strace: ~600 page reads and
/// writes and a 5 ms fsync each). At 40 MiB (unless a long read holds the WAL) pages written
/// repeatedly (the tables' last pages, the id index) are copied once per checkpoint, and
/// checkpoints are rare. In pages: 10,000 of 4 KiB, 40,960 of 1 KiB.
pub(super) const SQLITE_WAL_CHECKPOINT_BYTES: i64 = 40 << 20;

/// How many pages of `conn`'s database the WAL holds at [`SQLITE_WAL_CHECKPOINT_BYTES`]: its
/// `wal_autocheckpoint`, and the frames the WAL is pre-sized for (`wal`).
pub(super) fn wal_checkpoint_pages(conn: &mut SqliteConnection) -> QueryResult<i64> {
    #[derive(QueryableByName)]
    struct PageSize {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        page_size: i64,
    }
    let page = diesel::sql_query("PRAGMA page_size").get_result::<PageSize>(conn)?;
    Ok(SQLITE_WAL_CHECKPOINT_BYTES / page.page_size.max(512))
}

/// The page size of a new SQLite ledger. Every page an insert touches is written to the WAL and
/// synced: an insert touches about four (the table's last page, the id and date indexes, the
/// change log's last page), so at SQLite's default of 4 KiB it wrote ~17 KiB, at 1 KiB ~4 KiB
/// (issue 16). A policy row (~0.5 KiB) still fits a page. An existing file keeps its page size.
pub(super) const SQLITE_NEW_PAGE_SIZE: u32 = 1024;

/// The connect, keepalive and TCP timeouts of every PostgreSQL connection a master opens (pool,
/// writes, health check, LISTEN), in libpq's names and units. The master sets each one the URL
/// does not: with libpq's own defaults, a connection attempt to a host that accepts TCP but never
/// answers (a frozen server) waits for ever instead of moving on to the URL's next host, and a
/// connection whose peer vanished is noticed only after ~15 minutes of retransmissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PgTimeouts {
    /// `connect_timeout`, in seconds (libpq takes less than 2 as 2): the longest one host may
    /// take to accept a connection and finish its start-up before the next host is tried.
    pub connect: Duration,
    /// `keepalives`: 1 (on) or 0.
    pub keepalives: bool,
    /// `keepalives_idle`, in seconds: idle time before the first TCP keepalive probe.
    pub keepalives_idle: Duration,
    /// `keepalives_interval`, in seconds: between unanswered probes.
    pub keepalives_interval: Duration,
    /// `keepalives_count`: unanswered probes before the connection is taken for dead.
    pub keepalives_count: u32,
    /// `tcp_user_timeout`, in milliseconds: how long sent data may stay unacknowledged before
    /// the connection is taken for dead.
    pub tcp_user_timeout: Duration,
}

impl PgTimeouts {
    /// What the master sets where the URL says nothing: a host that does not answer is given up
    /// after 3 s, an idle connection to a vanished peer after 5 + 3 × 2 = 11 s, a busy one after
    /// 10 s of unacknowledged data. (A frozen server's kernel still acknowledges: calls have
    /// their own deadlines, `--write-timeout` and `--read-timeout`.)
    pub const DEFAULT: PgTimeouts = PgTimeouts {
        connect: Duration::from_secs(3),
        keepalives: true,
        keepalives_idle: Duration::from_secs(5),
        keepalives_interval: Duration::from_secs(2),
        keepalives_count: 3,
        tcp_user_timeout: Duration::from_secs(10),
    };

    /// libpq's names of the settings, the ones a URL may give.
    pub const PARAMETERS: [&'static str; 6] = [
        "connect_timeout",
        "keepalives",
        "keepalives_idle",
        "keepalives_interval",
        "keepalives_count",
        "tcp_user_timeout",
    ];

    /// The settings of `url`'s query, in libpq's units, and the defaults for the others.
    fn of(url: &str) -> Result<PgTimeouts, String> {
        let mut timeouts = PgTimeouts::DEFAULT;
        for (name, value) in query_parameters(url) {
            let number = || {
                value.parse::<u64>().map_err(|_| {
                    format!(
                        "the database URL's {name}={value:?} is not a whole number (libpq's units: connect_timeout, keepalives_idle and keepalives_interval in seconds, tcp_user_timeout in milliseconds)"
                    )
                })
            };
            match name {
                "connect_timeout" => timeouts.connect = Duration::from_secs(number()?.max(2)),
                "keepalives" => timeouts.keepalives = number()? != 0,
                "keepalives_idle" => timeouts.keepalives_idle = Duration::from_secs(number()?),
                "keepalives_interval" => {
                    timeouts.keepalives_interval = Duration::from_secs(number()?)
                }
                "keepalives_count" => {
                    timeouts.keepalives_count = u32::try_from(number()?)
                        .map_err(|_| format!("the database URL's {name} is too large"))?
                }
                "tcp_user_timeout" => timeouts.tcp_user_timeout = Duration::from_millis(number()?),
                _ => {}
            }
        }
        Ok(timeouts)
    }

    /// The settings as libpq URL parameters: `connect_timeout=3&keepalives=1&...`.
    fn as_parameters(&self) -> [(&'static str, String); 6] {
        [
            ("connect_timeout", self.connect.as_secs().to_string()),
            ("keepalives", u8::from(self.keepalives).to_string()),
            (
                "keepalives_idle",
                self.keepalives_idle.as_secs().to_string(),
            ),
            (
                "keepalives_interval",
                self.keepalives_interval.as_secs().to_string(),
            ),
            ("keepalives_count", self.keepalives_count.to_string()),
            (
                "tcp_user_timeout",
                self.tcp_user_timeout.as_millis().to_string(),
            ),
        ]
    }
}

/// A PostgreSQL URL cut around its hosts: what comes before them, each `HOST[:PORT]` of the
/// authority (`postgres://user@h1:5432,h2:5433/db`), and what comes after them; `None` when the
/// URL names its hosts otherwise (`?host=`).
fn split_hosts(url: &str) -> Option<(&str, Vec<&str>, &str)> {
    let start = url.find("://")? + 3;
    let authority_end = url[start..]
        .find(['/', '?'])
        .map_or(url.len(), |end| start + end);
    let hosts_start = url[start..authority_end]
        .rfind('@')
        .map_or(start, |at| start + at + 1);
    let hosts = &url[hosts_start..authority_end];
    if hosts.is_empty() {
        return None;
    }
    Some((
        &url[..hosts_start],
        hosts.split(',').collect(),
        &url[authority_end..],
    ))
}

/// The `NAME=VALUE` pairs of a URL's query (before any `#`), in order; values as written.
fn query_parameters(url: &str) -> impl Iterator<Item = (&str, &str)> {
    let query = url.split_once('?').map_or("", |(_, query)| query);
    let query = query.split_once('#').map_or(query, |(query, _)| query);
    query.split('&').filter_map(|pair| pair.split_once('='))
}

/// Where the ledger lives, parsed from `--database-url`.
#[derive(Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    /// `sqlite://PATH`: a SQLite file (created if missing).
    Sqlite(PathBuf),
    /// `postgres://...` or `postgresql://...`: a PostgreSQL database.
    Postgres(String),
}

impl std::str::FromStr for DatabaseUrl {
    type Err = String;

    /// Errors show the text with its secrets redacted ([`redact_secrets`]): they are printed.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("sqlite://") {
            if path.is_empty() || path == ":memory:" {
                return Err(format!(
                    "{:?}: a SQLite database URL needs a file path, as in sqlite://blockchain.db",
                    redact_secrets(s)
                ));
            }
            Ok(DatabaseUrl::Sqlite(PathBuf::from(path)))
        } else if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            PgTimeouts::of(s)?;
            Ok(DatabaseUrl::Postgres(s.to_string()))
        } else {
            Err(format!(
                "{:?} is not a database URL: use sqlite://PATH or postgres://USER@HOST:PORT/DATABASE",
                redact_secrets(s)
            ))
        }
    }
}

impl DatabaseUrl {
    /// A command-line parser of database URLs whose errors never repeat the text given: clap
    /// prints a refused value whole, secrets included, unless the parser makes the error itself.
    pub fn clap_parser() -> DatabaseUrlParser {
        DatabaseUrlParser
    }
}

/// See [`DatabaseUrl::clap_parser`].
#[derive(Debug, Clone, Copy)]
pub struct DatabaseUrlParser;

impl clap::builder::TypedValueParser for DatabaseUrlParser {
    type Value = DatabaseUrl;

    fn parse_ref(
        &self,
        _cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<DatabaseUrl, clap::Error> {
        let refuse = |reason: String| {
            let flag = arg.map_or_else(String::new, |a| format!("{a}: "));
            clap::Error::raw(
                clap::error::ErrorKind::ValueValidation,
                format!("{flag}{reason}\n"),
            )
        };
        let text = value
            .to_str()
            .ok_or_else(|| refuse("the database URL is not UTF-8".into()))?;
        text.parse().map_err(refuse)
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DatabaseUrl::Sqlite(path) => write!(f, "sqlite://{}", path.display()),
            DatabaseUrl::Postgres(url) => f.write_str(&redact_secrets(url)),
        }
    }
}

/// `text` (a database URL, or any text that may hold one) with every password-like part
/// replaced by `***`: the password of a URL's user (`USER:PASSWORD@`, of every host of a
/// multi-host URL), and the value of every parameter whose name holds `password`, `secret` or
/// `token` (`?password=`, `&sslpassword=`, libpq's `password=` in a key/value string).
pub fn redact_secrets(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    // USER:PASSWORD@ after a scheme, misspelled or not.
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        out.push_str(&rest[..at + 3]);
        rest = &rest[at + 3..];
        let authority_end = rest.find(['/', '?', '#', ' ']).unwrap_or(rest.len());
        let authority = &rest[..authority_end];
        match authority.rfind('@') {
            Some(userinfo_end) => {
                let userinfo = &authority[..userinfo_end];
                match userinfo.find(':') {
                    Some(colon) => {
                        out.push_str(&userinfo[..colon]);
                        out.push_str(":***");
                    }
                    None => out.push_str(userinfo),
                }
                out.push_str(&authority[userinfo_end..]);
            }
            None => out.push_str(authority),
        }
        rest = &rest[authority_end..];
    }
    out.push_str(rest);
    // NAME=VALUE parameters, in a query or a key/value string.
    let mut redacted = String::with_capacity(out.len());
    let mut rest = out.as_str();
    while let Some(eq) = rest.find('=') {
        let name_start = rest[..eq]
            .rfind(['?', '&', ' ', ';'])
            .map_or(0, |at| at + 1);
        let name = rest[name_start..eq].to_ascii_lowercase();
        redacted.push_str(&rest[..=eq]);
        rest = &rest[eq + 1..];
        if ["password", "secret", "token"]
            .iter()
            .any(|n| name.contains(n))
        {
            let value_end = rest.find(['&', ' ', ';', '#']).unwrap_or(rest.len());
            redacted.push_str("***");
            rest = &rest[value_end..];
        }
    }
    redacted.push_str(rest);
    redacted
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl DatabaseUrl {
    /// PostgreSQL: the connection timeouts of the URL, and the master's defaults for the rest.
    pub fn pg_timeouts(&self) -> Option<PgTimeouts> {
        match self {
            DatabaseUrl::Sqlite(_) => None,
            // Checked when the URL was parsed.
            DatabaseUrl::Postgres(url) => Some(PgTimeouts::of(url).unwrap_or(PgTimeouts::DEFAULT)),
        }
    }

    /// The URL libpq connects with: the given one, and the master's timeouts it does not set;
    /// with several hosts, host number `first` (from 0, in the URL's order) tried first.
    fn libpq_url(url: &str, first: Option<usize>) -> String {
        let given: Vec<&str> = query_parameters(url).map(|(name, _)| name).collect();
        let timeouts = PgTimeouts::of(url).unwrap_or(PgTimeouts::DEFAULT);
        let (base, fragment) = url
            .split_once('#')
            .map_or((url, None), |(b, f)| (b, Some(f)));
        let mut full = match (first, split_hosts(base)) {
            (Some(first), Some((before, hosts, after))) if first < hosts.len() => {
                let mut ordered = vec![hosts[first]];
                ordered.extend(
                    hosts
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| *i != first)
                        .map(|(_, h)| *h),
                );
                format!("{before}{}{after}", ordered.join(","))
            }
            _ => base.to_string(),
        };
        for (name, value) in timeouts.as_parameters() {
            if !given.contains(&name) {
                full.push(if full.contains('?') { '&' } else { '?' });
                full.push_str(name);
                full.push('=');
                full.push_str(&value);
            }
        }
        if let Some(fragment) = fragment {
            full.push('#');
            full.push_str(fragment);
        }
        full
    }

    /// PostgreSQL with several hosts: which of the URL's hosts (from 0, in its order) is at
    /// `peer`, the address a connection went to. Names are resolved.
    pub(super) fn host_at(&self, peer: SocketAddr) -> Option<usize> {
        let DatabaseUrl::Postgres(url) = self else {
            return None;
        };
        let base = url.split_once('#').map_or(url.as_str(), |(b, _)| b);
        let (_, hosts, _) = split_hosts(base)?;
        if hosts.len() < 2 {
            return None;
        }
        hosts.iter().position(|host| {
            let (name, port) = match host.rsplit_once(':') {
                // `[::1]:5432`, `h:5432`; a bare IPv6 address has no brackets and no port.
                Some((name, port)) if !name.is_empty() && !port.contains(']') => {
                    (name, port.parse().unwrap_or(5432))
                }
                _ => (*host, 5432),
            };
            let name = name.trim_start_matches('[').trim_end_matches(']');
            (name, port)
                .to_socket_addrs()
                .is_ok_and(|mut addrs| addrs.any(|a| a == peer))
        })
    }

    /// Opens a connection, set up for the ledger: SQLite's pragmas, PostgreSQL's custom plans.
    /// With several PostgreSQL hosts, host number `first` is tried first (see
    /// [`DatabaseUrl::host_at`]).
    pub(super) fn connect(
        &self,
        first: Option<usize>,
    ) -> Result<AnyConnection, diesel::r2d2::Error> {
        use diesel::r2d2::Error;
        match self {
            DatabaseUrl::Sqlite(path) => {
                let mut conn = SqliteConnection::establish(&path.to_string_lossy())
                    .map_err(Error::ConnectionError)?;
                conn.batch_execute(SQLITE_CONNECTION_PRAGMAS)
                    .map_err(Error::QueryError)?;
                let pages = wal_checkpoint_pages(&mut conn).map_err(Error::QueryError)?;
                conn.batch_execute(&format!("PRAGMA wal_autocheckpoint = {pages};"))
                    .map_err(Error::QueryError)?;
                Ok(AnyConnection::Sqlite(conn))
            }
            DatabaseUrl::Postgres(url) => {
                let mut conn = PgConnection::establish(&Self::libpq_url(url, first))
                    .map_err(Error::ConnectionError)?;
                // diesel keeps its statements prepared. PostgreSQL would soon switch them to one
                // generic plan, made while the ledger was small: a sequential scan that then
                // stays cached as the table grows (the id lookup cost 1.5 ms at 24,000 rows).
                conn.batch_execute("SET plan_cache_mode = force_custom_plan")
                    .map_err(Error::QueryError)?;
                Ok(AnyConnection::Postgres(conn))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// libpq gets the master's timeouts for what the URL does not set, in libpq's units; the
    /// URL's own values win, and one libpq would refuse is refused at parse time.
    #[test]
    fn timeouts_are_set_unless_the_url_sets_them() {
        let url = "postgres://u@h1:5432,h2:5433/db?target_session_attrs=read-write";
        assert_eq!(
            DatabaseUrl::libpq_url(url, None),
            format!(
                "{url}&connect_timeout=3&keepalives=1&keepalives_idle=5&keepalives_interval=2&keepalives_count=3&tcp_user_timeout=10000"
            )
        );
        let parsed: DatabaseUrl = url.parse().unwrap();
        assert_eq!(parsed.pg_timeouts(), Some(PgTimeouts::DEFAULT));

        let own = "postgres://u@h/db?connect_timeout=7&tcp_user_timeout=2500&keepalives=0#f";
        assert_eq!(
            DatabaseUrl::libpq_url(own, None),
            "postgres://u@h/db?connect_timeout=7&tcp_user_timeout=2500&keepalives=0&keepalives_idle=5&keepalives_interval=2&keepalives_count=3#f"
        );
        let parsed: DatabaseUrl = own.parse().unwrap();
        let timeouts = parsed.pg_timeouts().unwrap();
        assert_eq!(timeouts.connect, Duration::from_secs(7));
        assert_eq!(timeouts.tcp_user_timeout, Duration::from_millis(2500));
        assert!(!timeouts.keepalives);
        assert_eq!(timeouts.keepalives_count, 3);

        assert_eq!(
            DatabaseUrl::libpq_url("postgres://u@h/db", None),
            "postgres://u@h/db?connect_timeout=3&keepalives=1&keepalives_idle=5&keepalives_interval=2&keepalives_count=3&tcp_user_timeout=10000"
        );
        // The host that took the last connection is tried first; the others keep their order.
        let three = "postgres://u:p@a:1,127.0.0.1:2,[::1]:3/db?x=1";
        assert!(
            DatabaseUrl::libpq_url(three, Some(2))
                .starts_with("postgres://u:p@[::1]:3,a:1,127.0.0.1:2/db?x=1&connect_timeout=3")
        );
        assert!(DatabaseUrl::libpq_url(three, Some(7)).starts_with(three));
        let parsed: DatabaseUrl = three.parse().unwrap();
        assert_eq!(parsed.host_at("127.0.0.1:2".parse().unwrap()), Some(1));
        assert_eq!(parsed.host_at("[::1]:3".parse().unwrap()), Some(2));
        assert_eq!(parsed.host_at("127.0.0.1:9".parse().unwrap()), None);
        let one: DatabaseUrl = "postgres://u@127.0.0.1:2/db".parse().unwrap();
        assert_eq!(one.host_at("127.0.0.1:2".parse().unwrap()), None);
        let refused = "postgres://u@h/db?connect_timeout=2s"
            .parse::<DatabaseUrl>()
            .unwrap_err();
        assert!(
            refused.contains("connect_timeout") && refused.contains("seconds"),
            "{refused}"
        );
        assert_eq!(
            "sqlite://x.db"
                .parse::<DatabaseUrl>()
                .unwrap()
                .pg_timeouts(),
            None
        );
    }

    #[test]
    fn secrets_never_show() {
        for (given, shown) in [
            (
                "postgres://ledger:SECRET@db:5432/blockchain",
                "postgres://ledger:***@db:5432/blockchain",
            ),
            (
                "postgres://127.0.0.1:1/db?password=SECRET",
                "postgres://127.0.0.1:1/db?password=***",
            ),
            (
                "postgres:///db?host=/run&sslpassword=SECRET&sslmode=require",
                "postgres:///db?host=/run&sslpassword=***&sslmode=require",
            ),
            (
                "postgresql://u:SECRET@h1:5432,h2:5433/db?PassWord=SECRET#x",
                "postgresql://u:***@h1:5432,h2:5433/db?PassWord=***#x",
            ),
            ("postgress://u:p@ss:SECRET@h/db", "postgress://u:***@h/db"),
            (
                "host=db user=u password=SECRET dbname=x",
                "host=db user=u password=*** dbname=x",
            ),
            (
                "postgres://u@h/db?token=SECRET",
                "postgres://u@h/db?token=***",
            ),
            ("sqlite://blockchain.db", "sqlite://blockchain.db"),
        ] {
            assert_eq!(redact_secrets(given), shown, "{given}");
        }
        let url: DatabaseUrl = "postgres://u:SECRET@h/db?password=SECRET".parse().unwrap();
        assert!(!url.to_string().contains("SECRET"), "{url}");
        assert!(!format!("{url:?}").contains("SECRET"));
        let error = "postgress://u:SECRET@h/db"
            .parse::<DatabaseUrl>()
            .unwrap_err();
        assert!(!error.contains("SECRET"), "{error}");
        assert!(error.contains("postgress://u:***@h/db"), "{error}");
    }
}
