//! Watching members' state records (inotify): when each member recorded each seq.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use crate::workload::state_seq;

pub(crate) struct Watcher {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Vec<Vec<(u64, Instant)>>>,
}

pub(crate) fn watch(dirs: Vec<PathBuf>) -> Watcher {
    let stop = Arc::new(AtomicBool::new(false));
    let stopping = stop.clone();
    let (ready_tx, ready_rx) = mpsc::channel();
    let handle = std::thread::spawn(move || {
        // SAFETY: plain inotify calls on a descriptor this thread owns.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        assert!(fd >= 0, "inotify_init1");
        let mut wds = HashMap::new();
        for (k, dir) in dirs.iter().enumerate() {
            let c = std::ffi::CString::new(dir.to_str().unwrap()).unwrap();
            let wd = unsafe {
                libc::inotify_add_watch(fd, c.as_ptr(), libc::IN_MOVED_TO | libc::IN_CLOSE_WRITE)
            };
            assert!(wd >= 0, "inotify_add_watch");
            wds.insert(wd, k);
        }
        let mut seen: Vec<Vec<(u64, Instant)>> = vec![Vec::new(); dirs.len()];
        for (k, dir) in dirs.iter().enumerate() {
            if let Some(s) = state_seq(dir) {
                seen[k].push((s, Instant::now()));
            }
        }
        ready_tx.send(()).unwrap();
        let mut buf = vec![0u8; 1 << 16];
        let deadline = Instant::now() + Duration::from_secs(900);
        while !stopping.load(Ordering::Relaxed) && Instant::now() < deadline {
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            let n = unsafe { libc::poll(&mut pfd, 1, 50) };
            if n <= 0 {
                continue;
            }
            let got = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            let now = Instant::now();
            if got <= 0 {
                continue;
            }
            let mut touched = vec![false; dirs.len()];
            let mut at = 0usize;
            while at + 16 <= got as usize {
                let wd = i32::from_ne_bytes(buf[at..at + 4].try_into().unwrap());
                let len = u32::from_ne_bytes(buf[at + 12..at + 16].try_into().unwrap()) as usize;
                let name = &buf[at + 16..at + 16 + len];
                let name = name.split(|b| *b == 0).next().unwrap_or_default();
                if name == b"blockchain.json.state"
                    && let Some(k) = wds.get(&wd)
                {
                    touched[*k] = true;
                }
                at += 16 + len;
            }
            for (k, t) in touched.iter().enumerate() {
                if *t
                    && let Some(s) = state_seq(&dirs[k])
                    && seen[k].last().is_none_or(|(last, _)| s > *last)
                {
                    seen[k].push((s, now));
                }
            }
        }
        unsafe { libc::close(fd) };
        seen
    });
    ready_rx.recv().unwrap();
    Watcher { stop, handle }
}

impl Watcher {
    pub(crate) fn finish(self) -> Vec<Vec<(u64, Instant)>> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap()
    }
}

/// When `events` (ascending seq) first held `seq`.
pub(crate) fn arrival(events: &[(u64, Instant)], seq: u64) -> Option<Instant> {
    let at = events.partition_point(|(s, _)| *s < seq);
    events.get(at).map(|(_, t)| *t)
}

pub(crate) async fn wait_members(dirs: &[PathBuf], seq: u64, seconds: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < deadline {
        if dirs.iter().all(|d| state_seq(d).is_some_and(|s| s >= seq)) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    false
}
