//! Reading a Prometheus `/metrics` endpoint of a running binary.

use std::io::{Read, Write};
use std::net::TcpStream;

use crate::within;

/// A loopback port that was free a moment ago, for a server whose address must be given up front.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free loopback port")
        .port()
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
