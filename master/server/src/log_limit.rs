//! Log lines that clients can cause at will (refused calls, malformed messages): at most one per
//! interval, the others counted, and the count told with the next line that is logged. Nobody
//! can flood the log, and nothing goes unseen.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One kind of line, limited to one per `interval`.
pub struct LogLimit {
    interval: Duration,
    state: Mutex<State>,
}

struct State {
    last: Option<Instant>,
    suppressed: u64,
}

impl LogLimit {
    /// A limit of one line per `interval`.
    pub const fn new(interval: Duration) -> LogLimit {
        LogLimit {
            interval,
            state: Mutex::new(State {
                last: None,
                suppressed: 0,
            }),
        }
    }

    /// Whether a line may be logged now: `Some(n)`, with `n` the lines left out since the last
    /// one (to say with this one), or `None` (this one is counted instead).
    pub fn admit(&self) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        match state.last {
            Some(last) if now.duration_since(last) < self.interval => {
                state.suppressed += 1;
                None
            }
            _ => {
                state.last = Some(now);
                Some(std::mem::take(&mut state.suppressed))
            }
        }
    }
}

/// `" (N more like it since the last one)"` for `suppressed` > 0, else nothing.
pub fn more(suppressed: u64) -> String {
    match suppressed {
        0 => String::new(),
        n => format!(" ({n} more like it since the last one logged)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_and_the_count_of_the_rest() {
        let limit = LogLimit::new(Duration::from_millis(200));
        assert_eq!(limit.admit(), Some(0));
        for _ in 0..1000 {
            assert_eq!(limit.admit(), None);
        }
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(limit.admit(), Some(1000));
        assert_eq!(more(1000), " (1000 more like it since the last one logged)");
        assert_eq!(more(0), "");
    }
}
