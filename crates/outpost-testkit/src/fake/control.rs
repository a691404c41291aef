//! What tests control about every call: latency, injected faults and the
//! pause gate (the prologue in [`super::call`] applies them).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tonic::Code;

use super::state::{Shared, lock};
use super::{FakeUpstream, Method, poll_until};

/// What an injected fault does.
#[derive(Clone, Debug)]
pub enum FaultAction {
    /// The call fails with this code before doing anything (after latency).
    Fail(Code),
    /// A ByteStream Read sends `bytes` bytes then fails with `code`; a Write
    /// accepts `bytes` bytes (kept as a resumable partial upload) then fails.
    /// Applies to Read and Write only.
    AbortAfter {
        /// Bytes that pass before the break.
        bytes: u64,
        /// The code the stream ends with.
        code: Code,
    },
}

/// A fault rule: the first matching rule with uses left applies.
#[derive(Clone, Debug)]
pub struct Fault {
    /// `None`: any method.
    pub method: Option<Method>,
    /// How many calls it applies to; `None`: until cleared.
    pub times: Option<u64>,
    /// What it does.
    pub action: FaultAction,
}

/// Delays added to calls.
#[derive(Default)]
pub(super) struct Latency {
    pub(super) all: Duration,
    pub(super) per_method: HashMap<Method, Duration>,
    pub(super) read_chunk_delay: Duration,
}

/// Which calls park at entry.
#[derive(Default)]
pub(super) struct PauseState {
    all: bool,
    methods: HashSet<Method>,
}

/// Counts a parked call while it waits.
struct ParkedGuard<'a>(&'a AtomicUsize);

impl Drop for ParkedGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Shared {
    /// The latency of a call of `method`.
    pub(super) fn latency_of(&self, method: Method) -> Duration {
        let l = lock(&self.latency);
        l.per_method.get(&method).copied().unwrap_or(l.all)
    }

    fn is_paused(&self, method: Method) -> bool {
        let p = lock(&self.pause);
        p.all || p.methods.contains(&method)
    }

    /// Parks until `method` is no longer paused.
    pub(super) async fn wait_while_paused(&self, method: Method) {
        if !self.is_paused(method) {
            return;
        }
        self.parked.fetch_add(1, Ordering::AcqRel);
        let _parked = ParkedGuard(&self.parked);
        loop {
            let notified = self.resumed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.is_paused(method) {
                return;
            }
            notified.await;
        }
    }

    /// Consumes one use of the first rule for `method` that `pick` accepts.
    pub(super) fn take_fault<T>(
        &self,
        method: Method,
        pick: impl Fn(&FaultAction) -> Option<T>,
    ) -> Option<T> {
        let mut faults = lock(&self.faults);
        let i = faults.iter().position(|f| {
            f.method.is_none_or(|m| m == method)
                && f.times.is_none_or(|n| n > 0)
                && pick(&f.action).is_some()
        })?;
        let out = pick(&faults[i].action);
        if let Some(n) = faults[i].times.as_mut() {
            *n -= 1;
            if *n == 0 {
                faults.remove(i);
            }
        }
        out
    }

    /// The `AbortAfter` fault for the next stream of `method`, if any.
    pub(super) fn take_abort(&self, method: Method) -> Option<(u64, Code)> {
        self.take_fault(method, |a| match a {
            FaultAction::AbortAfter { bytes, code } => Some((*bytes, *code)),
            FaultAction::Fail(_) => None,
        })
    }
}

/// Latency, faults and the pause gate.
impl FakeUpstream {
    /// Delay added to the start of every call (unless a method has its own).
    pub fn set_latency(&self, latency: Duration) {
        lock(&self.s.latency).all = latency;
    }

    /// Delay for one method; `None` falls back to [`Self::set_latency`].
    pub fn set_method_latency(&self, method: Method, latency: Option<Duration>) {
        let mut l = lock(&self.s.latency);
        match latency {
            Some(d) => l.per_method.insert(method, d),
            None => l.per_method.remove(&method),
        };
    }

    /// Delay before each ByteStream ReadResponse (makes transfers slow, so a
    /// second reader can join one in progress).
    pub fn set_read_chunk_delay(&self, delay: Duration) {
        lock(&self.s.latency).read_chunk_delay = delay;
    }

    /// Bytes per ByteStream ReadResponse (default 64 KiB).
    pub fn set_read_chunk_size(&self, bytes: usize) {
        self.s.read_chunk.store(bytes.max(1), Ordering::Relaxed);
    }

    // ------------------------------------------------------------ faults

    /// Adds a fault rule (see [`Fault`]).
    pub fn add_fault(&self, fault: Fault) {
        lock(&self.s.faults).push(fault);
    }

    /// The next `n` calls, of any method, fail with `code`.
    pub fn fail_next(&self, n: u64, code: Code) {
        self.add_fault(Fault {
            method: None,
            times: Some(n),
            action: FaultAction::Fail(code),
        });
    }

    /// The next `n` calls of `method` fail with `code`.
    pub fn fail_next_of(&self, method: Method, n: u64, code: Code) {
        self.add_fault(Fault {
            method: Some(method),
            times: Some(n),
            action: FaultAction::Fail(code),
        });
    }

    /// Every call of `method` fails with `code` until [`Self::clear_faults`].
    pub fn fail_method(&self, method: Method, code: Code) {
        self.add_fault(Fault {
            method: Some(method),
            times: None,
            action: FaultAction::Fail(code),
        });
    }

    /// The next Read (or Write) stream breaks with `code` after `bytes` bytes.
    pub fn abort_next_stream(&self, method: Method, bytes: u64, code: Code) {
        assert!(
            matches!(method, Method::Read | Method::Write),
            "only Read and Write streams can be aborted"
        );
        self.add_fault(Fault {
            method: Some(method),
            times: Some(1),
            action: FaultAction::AbortAfter { bytes, code },
        });
    }

    /// Removes every fault rule.
    pub fn clear_faults(&self) {
        lock(&self.s.faults).clear();
    }

    // ------------------------------------------------------------ gate

    /// Parks every new call at entry until [`Self::resume`].
    pub fn pause(&self) {
        lock(&self.s.pause).all = true;
    }

    /// Parks new calls of `method` only.
    pub fn pause_method(&self, method: Method) {
        lock(&self.s.pause).methods.insert(method);
    }

    /// Lets every parked call continue; nothing is paused afterwards.
    pub fn resume(&self) {
        *lock(&self.s.pause) = PauseState::default();
        self.s.resumed.notify_waiters();
    }

    /// Calls parked now.
    pub fn parked(&self) -> usize {
        self.s.parked.load(Ordering::Acquire)
    }

    /// Waits until at least `n` calls are parked; false on timeout.
    pub async fn wait_parked(&self, n: usize, timeout: Duration) -> bool {
        poll_until(timeout, || self.parked() >= n).await
    }
}
