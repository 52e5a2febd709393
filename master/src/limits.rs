//! Limits that keep one client from hurting the others: policy size and nesting, and how many
//! streams are open in all and per client address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use crate::error::LedgerError;

/// Checks the size and the nesting depth of a policy's text before it is parsed, so that a huge
/// or deeply nested document costs a scan, not a parse.
pub fn check_policy_text(
    text: &str,
    max_bytes: usize,
    max_depth: usize,
) -> Result<(), LedgerError> {
    if text.len() > max_bytes {
        return Err(LedgerError::InvalidArgument(format!(
            "the policy is {} bytes; the limit is {max_bytes}",
            text.len()
        )));
    }
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for byte in text.bytes() {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > max_depth {
                    return Err(LedgerError::InvalidArgument(format!(
                        "the policy nests deeper than {max_depth} levels"
                    )));
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// Counts open streams, in all and per client address.
#[derive(Clone)]
pub struct StreamLimiter {
    max_total: usize,
    max_per_client: usize,
    open: Arc<Mutex<Counts>>,
}

#[derive(Default)]
struct Counts {
    total: usize,
    per_client: HashMap<IpAddr, usize>,
}

/// An open stream's place; dropping it frees the place.
pub struct StreamPermit {
    open: Arc<Mutex<Counts>>,
    client: Option<IpAddr>,
}

impl StreamLimiter {
    /// At most `max_total` streams, and `max_per_client` from one address.
    pub fn new(max_total: usize, max_per_client: usize) -> Self {
        StreamLimiter {
            max_total,
            max_per_client,
            open: Arc::default(),
        }
    }

    /// A place for one more stream from `client`, or RESOURCE_EXHAUSTED-worthy refusal.
    pub fn admit(&self, client: Option<IpAddr>) -> Result<StreamPermit, LedgerError> {
        let mut open = self.open.lock().expect("stream counts");
        if open.total >= self.max_total {
            return Err(LedgerError::TooManyStreams(format!(
                "{} streams are open; the limit is {}",
                open.total, self.max_total
            )));
        }
        if let Some(ip) = client {
            let mine = open.per_client.entry(ip).or_default();
            if *mine >= self.max_per_client {
                return Err(LedgerError::TooManyStreams(format!(
                    "{ip} has {mine} streams open; the limit per client is {}",
                    self.max_per_client
                )));
            }
            *mine += 1;
        }
        open.total += 1;
        Ok(StreamPermit {
            open: self.open.clone(),
            client,
        })
    }
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        let mut open = self.open.lock().expect("stream counts");
        open.total -= 1;
        if let Some(ip) = self.client
            && let Some(mine) = open.per_client.get_mut(&ip)
        {
            *mine -= 1;
            if *mine == 0 {
                open.per_client.remove(&ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_and_depth_are_limited_outside_strings_only() {
        assert!(check_policy_text(r#"{"a": {"b": [1]}}"#, 100, 3).is_ok());
        assert!(check_policy_text(r#"{"a": {"b": [[1]]}}"#, 100, 3).is_err());
        // Brackets inside strings, even after escaped quotes, are text.
        assert!(check_policy_text(r#"{"a": "[[[[\"{{{{"}"#, 100, 1).is_ok());
        assert!(check_policy_text(&"x".repeat(101), 100, 3).is_err());
    }

    #[test]
    fn streams_are_limited_in_all_and_per_client() {
        let limiter = StreamLimiter::new(3, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let first = limiter.admit(Some(a)).unwrap();
        let _second = limiter.admit(Some(a)).unwrap();
        assert!(limiter.admit(Some(a)).is_err(), "per client");
        let _third = limiter.admit(Some(b)).unwrap();
        assert!(limiter.admit(Some(b)).is_err(), "in all");
        drop(first);
        assert!(
            limiter.admit(Some(a)).is_ok(),
            "a closed stream frees its place"
        );
    }
}
