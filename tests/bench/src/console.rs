//! (9) The console's network map (issue 19) in headless Chromium (Debian's, driven through
//! `ledger_testkit::console::Browser`): for a network of 1,000 and of 10,000 policies, the
//! layout and first draw of the map (`window.__mapRenderMs`), the page load from the request of
//! `/api/policies` to the map drawn, and a redraw of the whole map (a pan or a zoom), each the
//! median of several page loads.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Instant;

use ledger_testkit::Master;
use ledger_testkit::console::{Browser, expected, network, seed};
use serde_json::{Value, json};

use crate::stats::median;

pub fn run(quick: bool, json_out: Option<&Path>) {
    crate::report::run_alone(json_out, async {
        let sizes: &[usize] = if quick { &[1_000] } else { &[1_000, 10_000] };
        let loads = if quick { 3 } else { 7 };
        let mut out = Vec::new();
        eprintln!(
            "(9) console: the network map in headless Chromium, median of {loads} page loads"
        );
        for &size in sizes {
            let dir = tempfile::tempdir().unwrap();
            let master = Master::start(dir.path(), &["--http-addr", "127.0.0.1:0"]);
            let policies = network(size);
            let started = Instant::now();
            seed(&master, &policies, 16).await;
            let seeded = started.elapsed().as_secs_f64();
            let (_, nodes) = expected(&policies);
            let addr = SocketAddr::from(([127, 0, 0, 1], master.metrics_port()));
            let mut browser = Browser::start();
            let (mut render, mut load, mut redraw) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..loads {
                let opened = browser.open(&format!("http://{addr}/"), 1600, 1000);
                assert_eq!(opened["status"], 200, "{opened}");
                assert_eq!(browser.eval("window.__console.nodeCount()"), nodes);
                render.push(browser.eval("window.__mapRenderMs").as_f64().unwrap());
                load.push(browser.eval("window.__mapLoadMs.total").as_f64().unwrap());
                redraw.push(browser.eval("window.__console.render()").as_f64().unwrap());
            }
            let errors = browser.errors();
            assert!(errors.is_empty(), "the page logged errors: {errors:#?}");
            let (render, load, redraw) = (median(&render), median(&load), median(&redraw));
            eprintln!(
                "  {size} policies ({nodes} nodes, inserted in {seeded:.1} s): render {render:.0} ms, page load {load:.0} ms, redraw {redraw:.1} ms"
            );
            out.push(json!({
                "policies": size,
                "nodes": nodes,
                "render_ms_median": render,
                "load_ms_median": load,
                "redraw_ms_median": redraw,
            }));
        }
        json!({ "console_map": Value::Array(out) })
    });
}
