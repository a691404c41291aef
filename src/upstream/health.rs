//! Upstream health: after the upstream stops answering, calls fail fast with
//! a clear UNAVAILABLE instead of each waiting for its own timeouts; one call
//! is let through now and then (with growing spacing) to notice recovery.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(15);

/// Whether the upstream is believed reachable.
pub struct Health {
    /// Where the upstream is, for messages.
    endpoint: String,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Set while the upstream is considered down.
    down: Option<Down>,
}

struct Down {
    since: Instant,
    /// No call goes through before this instant.
    next_probe: Instant,
    backoff: Duration,
    last_error: String,
}

impl Health {
    /// A healthy upstream at `endpoint`.
    pub fn new(endpoint: &str) -> Self {
        Health {
            endpoint: endpoint.to_string(),
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ok if a call may go out now; UNAVAILABLE while the upstream is down.
    /// When a probe is due, exactly one caller gets through.
    pub fn check(&self) -> Result<()> {
        let mut state = self.lock();
        let Some(down) = &mut state.down else {
            return Ok(());
        };
        let now = Instant::now();
        if now >= down.next_probe {
            down.next_probe = now + down.backoff;
            return Ok(());
        }
        Err(Error::Unavailable(format!(
            "upstream {} is unreachable (down for {}s: {}); retrying in {}ms",
            self.endpoint,
            down.since.elapsed().as_secs(),
            down.last_error,
            (down.next_probe - now).as_millis()
        )))
    }

    /// Whether the upstream is believed reachable, and while it is not, the
    /// last failure (the transport's or upstream's message; no endpoint,
    /// no headers).
    pub fn state(&self) -> (bool, Option<String>) {
        match &self.lock().down {
            None => (true, None),
            Some(down) => (false, Some(down.last_error.clone())),
        }
    }

    /// Records a successful call.
    pub fn succeeded(&self) {
        let mut state = self.lock();
        if let Some(down) = state.down.take() {
            tracing::info!(
                "upstream {} is reachable again after {}s",
                self.endpoint,
                down.since.elapsed().as_secs()
            );
        }
    }

    /// Records a call that failed because the upstream is unreachable.
    pub fn failed(&self, error: &str) {
        let mut state = self.lock();
        let now = Instant::now();
        match &mut state.down {
            Some(down) => {
                down.backoff = (down.backoff * 2).min(MAX_BACKOFF);
                down.next_probe = now + down.backoff;
                down.last_error = error.to_string();
            }
            None => {
                tracing::warn!(
                    "upstream {} is unreachable: {error}; serving local hits only",
                    self.endpoint
                );
                state.down = Some(Down {
                    since: now,
                    next_probe: now + FIRST_BACKOFF,
                    backoff: FIRST_BACKOFF,
                    last_error: error.to_string(),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fails_fast_then_lets_one_probe_through() {
        let health = Health::new("grpc://x:1");
        assert!(health.check().is_ok());
        health.failed("connection refused");
        assert_eq!(health.state(), (false, Some("connection refused".into())));
        let err = health.check().unwrap_err();
        assert!(matches!(err, Error::Unavailable(_)));
        assert!(err.to_string().contains("connection refused"));
        std::thread::sleep(FIRST_BACKOFF);
        assert!(health.check().is_ok(), "the probe goes through");
        assert!(health.check().is_err(), "only one probe");
        health.succeeded();
        assert!(health.check().is_ok());
        assert_eq!(health.state(), (true, None));
    }
}
