//! Brute-force slow-down: an address whose credentials failed several times
//! in a row waits before each further attempt is answered, longer each time
//! (exponential, capped); one success clears it. Guessing a token (256 random
//! bits) is hopeless anyway; this protects htpasswd passwords, and keeps a
//! misconfigured client from hammering the server.
//!
//! Addresses are remembered in a bounded LRU, so a flood of addresses costs
//! bounded memory (the oldest are forgotten).

use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::Duration;

use lru::LruCache;

/// Failures in a row answered without delay.
pub const FREE_FAILURES: u32 = 5;
/// The delay of the first slowed attempt; it doubles with each failure.
pub const FIRST_DELAY: Duration = Duration::from_millis(250);
/// The longest delay.
pub const MAX_DELAY: Duration = Duration::from_secs(5);
/// Addresses remembered.
const ADDRESSES: usize = 10_000;

/// Who is slowed down: a remote address, or the unix socket (None).
pub type Key = Option<IpAddr>;

/// Consecutive failures per address.
pub struct Throttle {
    failures: Mutex<LruCache<Key, u32>>,
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle {
            failures: Mutex::new(LruCache::new(
                NonZeroUsize::new(ADDRESSES).expect("not zero"),
            )),
        }
    }
}

impl Throttle {
    /// How long the next attempt from `key` waits before it is answered.
    pub fn delay(&self, key: Key) -> Option<Duration> {
        let failures = *self.failures.lock().expect("not poisoned").peek(&key)?;
        delay_after(failures)
    }

    /// Records a failure; returns how many there now are in a row.
    pub fn failed(&self, key: Key) -> u32 {
        let mut failures = self.failures.lock().expect("not poisoned");
        let n = failures.get(&key).copied().unwrap_or(0).saturating_add(1);
        failures.put(key, n);
        n
    }

    /// Records a success: the address starts afresh.
    pub fn succeeded(&self, key: Key) {
        let mut failures = self.failures.lock().expect("not poisoned");
        if failures.peek(&key).is_some() {
            failures.pop(&key);
        }
    }
}

/// The wait before answering an attempt that follows `failures` failures.
fn delay_after(failures: u32) -> Option<Duration> {
    let over = failures.checked_sub(FREE_FAILURES)?;
    let factor = 1u32.checked_shl(over.min(16)).unwrap_or(u32::MAX);
    Some(FIRST_DELAY.saturating_mul(factor).min(MAX_DELAY))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_start_after_the_free_failures_double_and_stop_at_the_cap() {
        assert_eq!(delay_after(0), None);
        assert_eq!(delay_after(FREE_FAILURES - 1), None);
        assert_eq!(delay_after(FREE_FAILURES), Some(FIRST_DELAY));
        assert_eq!(delay_after(FREE_FAILURES + 1), Some(FIRST_DELAY * 2));
        assert_eq!(delay_after(FREE_FAILURES + 30), Some(MAX_DELAY));
        assert_eq!(delay_after(u32::MAX), Some(MAX_DELAY));
    }

    #[test]
    fn a_success_clears_the_address_and_others_are_not_affected() {
        let throttle = Throttle::default();
        let a: Key = Some("10.0.0.1".parse().unwrap());
        let b: Key = Some("10.0.0.2".parse().unwrap());
        for _ in 0..FREE_FAILURES {
            assert_eq!(throttle.delay(a), None);
            throttle.failed(a);
        }
        assert_eq!(throttle.delay(a), Some(FIRST_DELAY));
        assert_eq!(throttle.delay(b), None);
        assert_eq!(throttle.delay(None), None);
        throttle.succeeded(a);
        assert_eq!(throttle.delay(a), None);
        assert_eq!(throttle.failed(a), 1);
    }
}
