//! Reading a Prometheus `/metrics` endpoint of a running binary.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use crate::within;

/// What `master` and `member` log once their metrics listener is bound, before its address.
const METRICS_LINE: &str = "metrics on http://";

/// The metrics address in the last `metrics on http://ADDR/metrics` line of `log` (text or JSON
/// lines). The binaries are given `--metrics-addr 127.0.0.1:0` and this is read afterwards: a
/// port picked in advance and released could be taken by another process before they bind it.
/// The last line, because a restarted process binds a new port and logs it after the old one.
pub fn logged_metrics_addr(log: &str) -> Option<SocketAddr> {
    let at = log.rfind(METRICS_LINE)? + METRICS_LINE.len();
    log[at..].split('/').next()?.parse().ok()
}

/// The TCP ports process `pid` is listening on (Linux): the inodes of its sockets
/// (`/proc/PID/fd`) matched against the LISTEN entries of `/proc/PID/net/tcp` and `tcp6`.
///
/// With this, a child can be told to bind port 0 and its port read afterwards, instead of
/// handing it a port picked in advance that another process may take before the child binds
/// it. (The binaries also log their metrics address: [`logged_metrics_addr`].)
pub fn listening_ports(pid: u32) -> Vec<u16> {
    let inodes: std::collections::HashSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| std::fs::read_link(entry.path()).ok())
        .filter_map(|target| {
            target
                .to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect();
    let mut ports = Vec::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode ...
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(&"0A"), Some(inode)) =
                (fields.get(1), fields.get(3), fields.get(9))
            else {
                continue;
            };
            if inode
                .parse()
                .is_ok_and(|inode: u64| inodes.contains(&inode))
                && let Some(port) = local
                    .rsplit_once(':')
                    .and_then(|(_, port)| u16::from_str_radix(port, 16).ok())
                && !ports.contains(&port)
            {
                ports.push(port);
            }
        }
    }
    ports
}

/// The text of `GET /metrics` on `127.0.0.1:port`.
pub fn scrape(port: u16) -> String {
    let mut connection = TcpStream::connect(("127.0.0.1", port)).expect("the metrics endpoint");
    connection
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    connection
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    connection.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    answer
}

/// [`scrape`] from async code, bounded in time.
pub async fn scrape_async(port: u16) -> String {
    within(30, "scraping the metrics", async {
        tokio::task::spawn_blocking(move || scrape(port))
            .await
            .unwrap()
    })
    .await
}

/// The value of the sample named exactly `series` (name and labels) in a scrape.
pub fn sample(scraped: &str, series: &str) -> Option<f64> {
    scraped
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}
