//! The error table: calls that ended with an error status, per code and
//! method, bounded, for the status report's recent errors.

use std::sync::Mutex;
use std::time::Instant;

use super::ErrorCount;
use super::codes::code_name;
use super::recent::Recent;

/// (code, method) pairs remembered at most: methods come from request
/// paths, which clients choose.
pub const CAPACITY: usize = 200;

/// Error counts per code and method.
pub struct Errors {
    table: Mutex<Recent<(tonic::Code, String), u64>>,
}

impl Default for Errors {
    fn default() -> Self {
        Errors {
            table: Mutex::new(Recent::new(CAPACITY)),
        }
    }
}

impl Errors {
    /// Counts a call of `method` that ended with `code` (not OK).
    pub fn record(&self, code: tonic::Code, method: &str, now: Instant) {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        *table.touch(&(code, method.to_string()), now) += 1;
    }

    /// The `n` most frequent (code, method) pairs, most frequent first.
    pub fn most_frequent(&self, n: usize, now: Instant) -> Vec<ErrorCount> {
        let table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let mut all: Vec<ErrorCount> = table
            .iter()
            .map(|((code, method), seen)| ErrorCount {
                code: code_name(*code).to_string(),
                method: method.clone(),
                count: seen.value,
                last_seen_seconds_ago: now.saturating_duration_since(seen.last_seen).as_secs(),
            })
            .collect();
        all.sort_by(|a, b| {
            (b.count, a.last_seen_seconds_ago, &a.code, &a.method).cmp(&(
                a.count,
                b.last_seen_seconds_ago,
                &b.code,
                &b.method,
            ))
        });
        all.truncate(n);
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_counted_per_code_and_method() {
        let errors = Errors::default();
        let now = Instant::now();
        errors.record(tonic::Code::NotFound, "ByteStream/Read", now);
        errors.record(tonic::Code::NotFound, "ByteStream/Read", now);
        errors.record(tonic::Code::InvalidArgument, "ByteStream/Read", now);
        let top = errors.most_frequent(10, now);
        assert_eq!(top.len(), 2);
        assert_eq!((top[0].code.as_str(), top[0].count), ("NOT_FOUND", 2));
        assert_eq!(top[1].code, "INVALID_ARGUMENT");
    }
}
