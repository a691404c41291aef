//! The one prologue every RPC of the fake goes through: the call is logged
//! (with what its request names), parks while paused, sleeps the latency and
//! may fail with an injected fault; then the handler runs and its outcome is
//! logged. Each service module says what its requests name ([`Logged`]).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use tonic::metadata::MetadataMap;
use tonic::{Code, Request, Response, Status};

use super::control::FaultAction;
use super::log::Call;
use super::state::{Shared, lock};
use super::{Method, Svc};
use crate::re;

/// What a call's log entry records of its request at entry.
#[derive(Default)]
pub(super) struct Entry {
    pub(super) instance: String,
    pub(super) digests: Vec<re::Digest>,
    pub(super) bytes_received: u64,
}

impl Entry {
    /// An entry naming `instance` and `digests`.
    pub(super) fn new(instance: &str, digests: Vec<re::Digest>) -> Self {
        Entry {
            instance: instance.to_string(),
            digests,
            bytes_received: 0,
        }
    }
}

/// A request the fake serves: what its log entry records.
pub(super) trait Logged {
    /// The log entry of this request (`s`: to look up operations).
    fn entry(&self, s: &Shared) -> Entry;
}

/// Requests whose log entry is their instance name alone.
macro_rules! logged_by_instance {
    ($($request:ty),* $(,)?) => {
        $(impl crate::fake::call::Logged for $request {
            fn entry(&self, _: &crate::fake::state::Shared) -> crate::fake::call::Entry {
                crate::fake::call::Entry::new(&self.instance_name, Vec::new())
            }
        })*
    };
}
pub(super) use logged_by_instance;

/// A call in progress: updates its log entry; counts in-flight calls.
pub(super) struct CallGuard {
    shared: Arc<Shared>,
    /// The [`Call::id`] of its log entry.
    pub(super) id: u64,
    finished: bool,
}

impl CallGuard {
    /// Edits the call's log entry.
    pub(super) fn update(&self, f: impl FnOnce(&mut Call)) {
        let mut log = lock(&self.shared.log);
        if let Ok(i) = log.calls.binary_search_by_key(&self.id, |c| c.id) {
            f(&mut log.calls[i]);
        }
    }

    /// Counts payload bytes sent.
    pub(super) fn add_sent(&self, n: u64) {
        self.update(|c| c.bytes_sent += n);
    }

    /// Counts payload bytes received.
    pub(super) fn add_received(&self, n: u64) {
        self.update(|c| c.bytes_received += n);
    }

    /// Records the final code.
    pub(super) fn finish(mut self, code: Code, injected: bool) {
        self.finished = true;
        self.update(|c| {
            c.code = Some(code);
            c.injected |= injected;
            c.finished = Some(Instant::now());
        });
    }

    /// Records the outcome of a handler.
    pub(super) fn complete<T>(self, result: &Result<T, Status>) {
        let code = match result {
            Ok(_) => Code::Ok,
            Err(s) => s.code(),
        };
        self.finish(code, false);
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        if !self.finished {
            self.update(|c| {
                c.code = Some(Code::Cancelled);
                c.finished = Some(Instant::now());
            });
        }
        self.shared.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Shared {
    /// The prologue: logs the call, then waits while paused, sleeps the
    /// latency and applies a `Fail` fault.
    pub(super) async fn begin(
        self: &Arc<Self>,
        method: Method,
        entry: Entry,
        headers: &MetadataMap,
    ) -> Result<CallGuard, Status> {
        let id = {
            let mut log = lock(&self.log);
            let id = log.next_id;
            log.next_id += 1;
            log.calls.push(Call {
                id,
                method,
                instance_name: entry.instance,
                headers: headers.clone(),
                digests: entry.digests,
                bytes_received: entry.bytes_received,
                bytes_sent: 0,
                compressed_blobs: 0,
                code: None,
                injected: false,
                started: Instant::now(),
                finished: None,
            });
            id
        };
        let now = self.in_flight.fetch_add(1, Ordering::AcqRel) + 1;
        self.max_in_flight.fetch_max(now, Ordering::AcqRel);
        let guard = CallGuard {
            shared: self.clone(),
            id,
            finished: false,
        };
        self.wait_while_paused(method).await;
        let latency = self.latency_of(method);
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        if let Some(code) = self.take_fault(method, |a| match a {
            FaultAction::Fail(code) => Some(*code),
            FaultAction::AbortAfter { .. } => None,
        }) {
            guard.finish(code, true);
            return Err(Status::new(
                code,
                format!("fake upstream: injected {code:?} for {}", method.name()),
            ));
        }
        Ok(guard)
    }

    /// [`Self::begin`] for a request that says what it names.
    pub(super) async fn enter<T: Logged>(
        self: &Arc<Self>,
        method: Method,
        request: Request<T>,
    ) -> Result<(CallGuard, T), Status> {
        let (headers, req) = (request.metadata().clone(), request.into_inner());
        let guard = self.begin(method, req.entry(self), &headers).await?;
        Ok((guard, req))
    }
}

impl Svc {
    /// A call answered at once: the prologue, `handle`, its outcome logged.
    pub(super) async fn unary<T: Logged, R>(
        &self,
        method: Method,
        request: Request<T>,
        handle: impl FnOnce(&CallGuard, T) -> Result<R, Status>,
    ) -> Result<Response<R>, Status> {
        let (guard, req) = self.s.enter(method, request).await?;
        let result = handle(&guard, req);
        guard.complete(&result);
        result.map(Response::new)
    }

    /// A call the fake does not implement (logged like any other).
    pub(super) async fn unimplemented<T: Logged, R>(
        &self,
        method: Method,
        request: Request<T>,
    ) -> Result<Response<R>, Status> {
        self.unary(method, request, |_, _| {
            Err(Status::unimplemented(format!(
                "fake upstream: {} is not implemented",
                method.name()
            )))
        })
        .await
    }
}
