//! A real browser for the console tests: Debian's Chromium, headless, driven by
//! `tests/testkit/console.js` (playwright-core from `tests/node_modules`, which never downloads
//! a browser), one JSON request and answer a line; a plain HTTP/1.1 GET for the routes'
//! status codes and headers; and a realistic network of policies to show.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::Master;
use crate::client::insert_ok;

use crate::ganache::node_modules;

/// The Chromium the tests drive: `LEDGER_CHROMIUM`, or Debian's `/usr/bin/chromium`.
pub fn chromium() -> PathBuf {
    std::env::var_os("LEDGER_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"))
}

/// A headless Chromium with one page, and its driver process.
pub struct Browser {
    child: Child,
    stdin: ChildStdin,
    answers: mpsc::Receiver<String>,
}

impl Browser {
    /// Starts Chromium (a fresh profile) through the driver. Panics, saying what to install,
    /// when Chromium or playwright-core is missing: the console tests never skip.
    pub fn start() -> Browser {
        let chromium = chromium();
        assert!(
            chromium.is_file(),
            "no Chromium at {}: the console tests need Debian's chromium package (apt-get install chromium; scripts/test.sh installs it as root), or LEDGER_CHROMIUM",
            chromium.display()
        );
        let modules = node_modules();
        assert!(
            modules.join("playwright-core/package.json").is_file(),
            "playwright-core is not installed in {}: run scripts/test.sh, or `npm ci` in tests/",
            modules.display()
        );
        let mut child = Command::new("node")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("console.js"))
            .env("NODE_PATH", &modules)
            .env("LEDGER_CHROMIUM", &chromium)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("starting the browser driver with node: {e}"));
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, answers) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Browser {
            child,
            stdin,
            answers,
        }
    }

    /// Sends `request` and returns the answer; panics on the driver's error or after 120 s.
    pub fn request(&mut self, request: Value) -> Value {
        let text = request.to_string();
        writeln!(self.stdin, "{text}").expect("writing to the browser driver");
        self.stdin.flush().expect("flushing to the browser driver");
        let line = self
            .answers
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|e| panic!("no answer from the browser driver to {text}: {e}"));
        let answer: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("the browser driver said {line:?}: {e}"));
        if let Some(error) = answer.get("error") {
            panic!(
                "the browser driver failed {text}: {}",
                error.as_str().unwrap_or_default()
            );
        }
        answer
    }

    /// Loads `url` at `width` × `height`: its HTTP status and, when 200, once the console is
    /// ready (policies drawn, feed open).
    pub fn open(&mut self, url: &str, width: u32, height: u32) -> Value {
        self.request(json!({"cmd": "open", "url": url, "width": width, "height": height}))
    }

    /// The value of the JavaScript expression `js` in the page.
    pub fn eval(&mut self, js: &str) -> Value {
        self.request(json!({"cmd": "eval", "js": js}))["value"].clone()
    }

    /// Waits until `js` is true in the page (polled every 10 ms): its value and the ms waited.
    pub fn wait(&mut self, js: &str, timeout: Duration) -> (Value, u64) {
        let answer = self
            .request(json!({"cmd": "wait", "js": js, "timeout_ms": timeout.as_millis() as u64}));
        (answer["value"].clone(), answer["ms"].as_u64().unwrap_or(0))
    }

    /// Types `text` into the field at `selector`.
    pub fn fill(&mut self, selector: &str, text: &str) {
        self.request(json!({"cmd": "type", "selector": selector, "text": text}));
    }

    /// Clicks the map's node `key`: the policy panel's text afterwards.
    pub fn click_node(&mut self, key: &str) -> String {
        self.request(json!({"cmd": "click_node", "key": key}))["text"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// A PNG of the page at `path`.
    pub fn screenshot(&mut self, path: &Path) {
        self.request(json!({"cmd": "screenshot", "path": path}));
    }

    /// The console's errors and uncaught exceptions so far.
    pub fn errors(&mut self) -> Vec<String> {
        self.request(json!({"cmd": "errors"}))["errors"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|e| e.as_str().unwrap_or_default().to_string())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "{}", json!({"cmd": "close"}));
        let _ = self.stdin.flush();
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP answer: status, headers (lowercase names) and body.
#[derive(Debug)]
pub struct HttpAnswer {
    /// The status code.
    pub status: u16,
    /// The headers, names in lowercase.
    pub headers: Vec<(String, String)>,
    /// The body (chunked bodies are left as sent).
    pub body: String,
}

impl HttpAnswer {
    /// The first header called `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// `GET path` on `addr` with `headers`, HTTP/1.1, `Connection: close`.
pub fn http_get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> HttpAnswer {
    let mut stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connecting {addr}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    let mut text = String::new();
    stream
        .read_to_string(&mut text)
        .unwrap_or_else(|e| panic!("reading GET {path}: {e}"));
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {head:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    HttpAnswer {
        status,
        headers,
        body: body.to_string(),
    }
}

/// A realistic network of `n` policies (masters, then per site a cluster with its tables, two
/// operators in it, and now and then a publisher or a query), with the ids given so that
/// operators can name their cluster before it is stored.
pub fn network(n: usize) -> Vec<String> {
    const CITIES: [&str; 12] = [
        "lyon", "oslo", "austin", "kyoto", "porto", "quito", "tartu", "perth", "dakar", "omaha",
        "turin", "malmo",
    ];
    const COMPANIES: [&str; 5] = ["Acme", "Globex", "Initech", "Umbrella", "Stark"];
    let id = |text: &str| {
        let mut a: u64 = 0xcbf2_9ce4_8422_2325;
        let mut b: u64 = 0x8422_2325_cbf2_9ce4;
        for byte in text.bytes() {
            a = (a ^ u64::from(byte)).wrapping_mul(0x100_0000_01b3);
            b = (b ^ u64::from(byte))
                .wrapping_mul(0x100_0000_01b3)
                .rotate_left(7);
        }
        format!("{a:016x}{b:016x}")
    };
    let mut out = vec![
        format!(
            r#"{{"master": {{"id": "{}", "name": "master-east", "company": "Acme", "ip": "10.0.0.1", "port": 32048, "rest_port": 32049}}}}"#,
            id("master-east")
        ),
        format!(
            r#"{{"master": {{"id": "{}", "name": "master-west", "company": "Acme", "ip": "10.0.0.2", "port": 32048, "rest_port": 32049}}}}"#,
            id("master-west")
        ),
    ];
    let mut site = 0;
    while out.len() < n {
        let city = CITIES[site % CITIES.len()];
        let company = COMPANIES[site % COMPANIES.len()];
        let (hi, lo) = (1 + site / 250, site % 250);
        let cluster_name = format!("cl-{city}-{site}");
        let cluster_id = id(&cluster_name);
        out.push(format!(
            r#"{{"cluster": {{"id": "{cluster_id}", "name": "{cluster_name}", "company": "{company}", "table": [{{"dbms": "lsl_demo", "name": "ping_sensor"}}, {{"dbms": "lsl_demo", "name": "percentagecpu_sensor"}}, {{"dbms": "{db}", "name": "readings_{city}"}}]}}}}"#,
            db = company.to_lowercase()
        ));
        for k in 0..2 {
            let name = format!("operator-{city}-{site}-{k}");
            out.push(format!(
                r#"{{"operator": {{"id": "{}", "name": "{name}", "company": "{company}", "ip": "10.{hi}.{lo}.{}", "port": 32148, "rest_port": 32149, "cluster": "{cluster_id}", "city": "{city}"}}}}"#,
                id(&name),
                10 + k
            ));
        }
        if site % 3 == 0 {
            let name = format!("publisher-{city}-{site}");
            out.push(format!(
                r#"{{"publisher": {{"id": "{}", "name": "{name}", "company": "{company}", "ip": "10.{hi}.{lo}.20", "port": 32248, "rest_port": 32249}}}}"#,
                id(&name)
            ));
        }
        if site % 5 == 0 {
            let name = format!("query-{city}-{site}");
            out.push(format!(
                r#"{{"query": {{"id": "{}", "name": "{name}", "company": "{company}", "ip": "10.{hi}.{lo}.30", "port": 32348, "rest_port": 32349}}}}"#,
                id(&name)
            ));
        }
        site += 1;
    }
    out.truncate(n);
    out
}

/// The policies by type, and the map's nodes: one a master, operator, publisher, query and
/// cluster, one a table of a cluster.
pub fn expected(policies: &[String]) -> (BTreeMap<String, u64>, usize) {
    let mut counts = BTreeMap::new();
    let mut nodes = 0;
    for text in policies {
        let value: Value = serde_json::from_str(text).unwrap();
        let (policy_type, body) = value.as_object().unwrap().iter().next().unwrap();
        *counts.entry(policy_type.clone()).or_insert(0) += 1;
        nodes += 1;
        if policy_type == "cluster" {
            nodes += body["table"].as_array().map_or(0, Vec::len);
        }
    }
    (counts, nodes)
}

/// Inserts `policies` with `clients` concurrent clients.
pub async fn seed(master: &Master, policies: &[String], clients: usize) {
    let chunk = policies.len().div_ceil(clients.max(1)).max(1);
    let mut tasks = Vec::new();
    for part in policies.chunks(chunk) {
        let part = part.to_vec();
        let mut client = master.client().await;
        tasks.push(tokio::spawn(async move {
            for policy in part {
                insert_ok(&mut client, &policy).await;
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}
