//! Exponential backoff with full jitter between reconnection attempts.
//!
//! The ceiling doubles after each failure up to a cap, and each delay is drawn uniformly
//! between zero and the ceiling, so that the members of a network that lost their master at the
//! same instant do not come back at the same instant.

use std::time::Duration;

/// The delays between attempts.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    ceiling: Duration,
}

impl Backoff {
    /// Delays starting at most `initial` apart, doubling up to `max`.
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        let initial = initial.max(Duration::from_millis(1));
        let max = max.max(initial);
        Backoff {
            initial,
            max,
            ceiling: initial,
        }
    }

    /// The delay before the next attempt; each call doubles the ceiling of the next.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling;
        self.ceiling = (self.ceiling * 2).min(self.max);
        let millis = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(fastrand::u64(0..=millis))
    }

    /// Starts over from the initial delay, after a success.
    pub fn reset(&mut self) {
        self.ceiling = self.initial;
    }

    /// The longest delay it ever waits.
    pub fn max(&self) -> Duration {
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_and_are_jittered() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
        let ceilings = [
            100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000,
        ];
        for ceiling in ceilings {
            let delay = backoff.next_delay();
            assert!(
                delay <= Duration::from_millis(ceiling),
                "{delay:?} > {ceiling}ms"
            );
        }
        // Full jitter: many draws at the cap are spread, not all equal.
        let draws: std::collections::HashSet<_> = (0..50).map(|_| backoff.next_delay()).collect();
        assert!(draws.len() > 10, "{draws:?}");
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }
}
