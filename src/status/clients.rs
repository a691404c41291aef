//! The client activity table: calls and errors per caller (tool,
//! invocation, credential), bounded, for the status report's busiest
//! clients.

use std::sync::Mutex;
use std::time::Instant;

use super::ClientActivity;
use super::recent::Recent;

/// Callers remembered at most (the least recently seen is forgotten).
pub const CAPACITY: usize = 1000;
/// Longest tool name or invocation id kept (they come from clients).
const MAX_FIELD: usize = 128;

/// Who made a call: `RequestMetadata`'s tool and invocation, and the
/// credential's name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Caller {
    /// `tool_name tool_version`, or `unknown` without request metadata.
    pub tool: String,
    /// `tool_invocation_id`, empty without one.
    pub invocation: String,
    /// The credential's name (`local:127.0.0.1` without `[auth]`), empty
    /// when the call was refused before one was known.
    pub client: String,
}

impl Caller {
    /// A caller from what the client sent, each field cut to a sane length.
    pub fn new(tool: &str, version: &str, invocation: &str) -> Self {
        let tool = match (tool.trim(), version.trim()) {
            ("", _) => "unknown".to_string(),
            (name, "") => name.to_string(),
            (name, version) => format!("{name} {version}"),
        };
        Caller {
            tool: clip(&tool),
            invocation: clip(invocation),
            client: String::new(),
        }
    }
}

/// `s`, at most [`MAX_FIELD`] characters.
fn clip(s: &str) -> String {
    s.chars().take(MAX_FIELD).collect()
}

#[derive(Default)]
struct Counts {
    calls: u64,
    errors: u64,
}

/// Calls per caller, bounded to [`CAPACITY`] callers.
pub struct Clients {
    table: Mutex<Recent<Caller, Counts>>,
}

impl Default for Clients {
    fn default() -> Self {
        Clients {
            table: Mutex::new(Recent::new(CAPACITY)),
        }
    }
}

impl Clients {
    /// Counts one completed call of `caller`, failed or not.
    pub fn record(&self, caller: &Caller, failed: bool, now: Instant) {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let counts = table.touch(caller, now);
        counts.calls += 1;
        counts.errors += u64::from(failed);
    }

    /// The `n` callers with the most calls, busiest first.
    pub fn busiest(&self, n: usize, now: Instant) -> Vec<ClientActivity> {
        let table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let mut all: Vec<ClientActivity> = table
            .iter()
            .map(|(caller, seen)| ClientActivity {
                tool: caller.tool.clone(),
                invocation: caller.invocation.clone(),
                client: caller.client.clone(),
                calls: seen.value.calls,
                errors: seen.value.errors,
                last_seen_seconds_ago: now.saturating_duration_since(seen.last_seen).as_secs(),
            })
            .collect();
        all.sort_by(|a, b| {
            (b.calls, a.last_seen_seconds_ago).cmp(&(a.calls, b.last_seen_seconds_ago))
        });
        all.truncate(n);
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callers_are_named_by_tool_and_version() {
        assert_eq!(Caller::new("bazel", "4.2.3", "inv").tool, "bazel 4.2.3");
        assert_eq!(Caller::new("bazel", "", "").tool, "bazel");
        assert_eq!(Caller::new("", "1.0", "").tool, "unknown");
        assert_eq!(
            Caller::new("x", "", &"i".repeat(1000)).invocation.len(),
            128
        );
    }

    #[test]
    fn the_busiest_callers_come_first() {
        let clients = Clients::default();
        let now = Instant::now();
        let a = Caller::new("bazel", "7", "a");
        let b = Caller::new("bst", "2", "b");
        clients.record(&a, false, now);
        for _ in 0..3 {
            clients.record(&b, true, now);
        }
        let top = clients.busiest(10, now);
        assert_eq!(top.len(), 2);
        assert_eq!(
            (top[0].tool.as_str(), top[0].calls, top[0].errors),
            ("bst 2", 3, 3)
        );
        assert_eq!((top[1].invocation.as_str(), top[1].calls), ("a", 1));
        assert_eq!(clients.busiest(1, now).len(), 1);
    }
}
