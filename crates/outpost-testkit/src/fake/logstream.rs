//! Remote Logstream of the fake: `LogStreamService.CreateLogStream`, and the
//! ByteStream side of a log stream (the ByteStream service hands log names
//! over here).
//!
//! - CreateLogStream: name `{parent}/logstreams/{n}` (`logstreams/{n}` for
//!   an empty parent), write name `{name}/{secret}`.
//! - Write to the write name appends to the log in memory (write_offset
//!   must equal the committed size); `finish_write` finalises it. Writing
//!   the read name is INVALID_ARGUMENT.
//! - Read of the name tails: committed bytes from `read_offset` (up to
//!   `read_limit`), then each new piece as it is written, and the stream
//!   ends once the log is finalised. Reading the write name is
//!   INVALID_ARGUMENT (as the spec requires).
//! - QueryWriteStatus of the write name: the committed size and whether it
//!   is finalised.
//! - Unknown names with a `logstreams` segment are NOT_FOUND.
//! - Readers in progress are counted ([`FakeUpstream::active_log_readers`]),
//!   so tests can see a cancelled read end upstream.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};

use super::call::{CallGuard, Entry, Logged};
use super::cas::BoxStream;
use super::state::{Shared, lock};
use super::{FakeUpstream, Method, Svc, poll_until};
use crate::bs;
use bazel_remote_apis::build::bazel::remote::logstream::v1::{
    CreateLogStreamRequest, LogStream, log_stream_service_server::LogStreamService,
};

/// What a log holds so far.
#[derive(Clone, Default)]
struct LogState {
    data: Vec<u8>,
    finished: bool,
}

/// The logs of the fake, by read name, and the write names.
#[derive(Default)]
pub(super) struct Logs {
    streams: Mutex<HashMap<String, watch::Sender<LogState>>>,
    /// Write name → read name.
    writers: Mutex<HashMap<String, String>>,
    next_id: AtomicU64,
    readers: AtomicUsize,
}

/// Which log a resource name names.
enum LogName {
    /// The read name of a known log.
    Read(watch::Sender<LogState>),
    /// The write name of a known log.
    Write(watch::Sender<LogState>),
    /// Has a `logstreams` segment but names no log.
    Unknown,
}

impl Logs {
    /// Classifies `name`; `None` when it is not a log name at all (CAS).
    fn lookup(&self, name: &str) -> Option<LogName> {
        let streams = lock(&self.streams);
        if let Some(log) = streams.get(name) {
            return Some(LogName::Read(log.clone()));
        }
        if let Some(log) = lock(&self.writers).get(name).and_then(|n| streams.get(n)) {
            return Some(LogName::Write(log.clone()));
        }
        name.split('/')
            .any(|s| s == "logstreams")
            .then_some(LogName::Unknown)
    }
}

/// Counts a Read in progress.
struct ReaderGuard<'a>(&'a AtomicUsize);

impl<'a> ReaderGuard<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        ReaderGuard(count)
    }
}

impl Drop for ReaderGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Logged for CreateLogStreamRequest {
    fn entry(&self, _: &Shared) -> Entry {
        // The parent stands in for the instance name in the call log.
        Entry::new(&self.parent, Vec::new())
    }
}

impl Shared {
    /// Whether `name` is the fake's to serve as a log (not a CAS name).
    pub(super) fn is_log_name(&self, name: &str) -> bool {
        self.logs.lookup(name).is_some()
    }
}

impl Svc {
    /// ByteStream Read of a log name (after the prologue).
    pub(super) fn read_log(
        &self,
        guard: CallGuard,
        req: bs::ReadRequest,
    ) -> Result<Response<BoxStream<bs::ReadResponse>>, Status> {
        let checked = match self.s.logs.lookup(&req.resource_name) {
            Some(LogName::Read(_)) if req.read_offset < 0 => Err(Status::out_of_range(format!(
                "fake upstream: negative read_offset {}",
                req.read_offset
            ))),
            Some(LogName::Read(_)) if req.read_limit < 0 => Err(Status::invalid_argument(
                "fake upstream: negative read_limit",
            )),
            Some(LogName::Read(log)) => Ok(log),
            Some(LogName::Write(_)) => Err(Status::invalid_argument(
                "fake upstream: a log's write name cannot be read",
            )),
            _ => Err(Status::not_found("fake upstream: no such log stream")),
        };
        let log = match checked {
            Ok(log) => log,
            Err(e) => {
                guard.finish(e.code(), false);
                return Err(e);
            }
        };
        let chunk = self.s.read_chunk.load(Ordering::Relaxed).max(1);
        let limit = match req.read_limit {
            0 => usize::MAX,
            n => n as usize,
        };
        let shared = self.s.clone();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let _reader = ReaderGuard::new(&shared.logs.readers);
            let mut changes = log.subscribe();
            let mut pos = req.read_offset as usize;
            let mut left = limit;
            loop {
                let (piece, finished, past_end) = {
                    let state = changes.borrow_and_update();
                    let end = state.data.len().min(pos.saturating_add(left));
                    let piece = state.data.get(pos..end).unwrap_or_default().to_vec();
                    (piece, state.finished, pos > state.data.len())
                };
                if past_end && finished {
                    let e = Status::out_of_range("fake upstream: read_offset past the end");
                    guard.finish(e.code(), false);
                    let _ = tx.send(Err(e)).await;
                    return;
                }
                for data in piece.chunks(chunk) {
                    if tx
                        .send(Ok(bs::ReadResponse {
                            data: data.to_vec(),
                        }))
                        .await
                        .is_err()
                    {
                        return; // the client went away: the guard records Cancelled
                    }
                    guard.add_sent(data.len() as u64);
                }
                pos += piece.len();
                left -= piece.len();
                if finished || left == 0 {
                    break;
                }
                tokio::select! {
                    changed = changes.changed() => {
                        if changed.is_err() {
                            break;
                        }
                    }
                    _ = tx.closed() => return,
                }
            }
            guard.finish(Code::Ok, false);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    /// ByteStream Write of a log name (after the prologue): appends.
    pub(super) async fn write_log(
        &self,
        guard: &CallGuard,
        first: bs::WriteRequest,
        stream: &mut Streaming<bs::WriteRequest>,
    ) -> Result<bs::WriteResponse, Status> {
        let log = match self.s.logs.lookup(&first.resource_name) {
            Some(LogName::Write(log)) => log,
            Some(LogName::Read(_)) => {
                return Err(Status::invalid_argument(
                    "fake upstream: write to a log's write name, not its name",
                ));
            }
            _ => return Err(Status::not_found("fake upstream: no such log stream")),
        };
        let mut msg = first;
        loop {
            let mut refused = None;
            log.send_modify(|state| {
                if state.finished {
                    refused = Some(Status::failed_precondition(
                        "fake upstream: the log stream is finalised",
                    ));
                } else if msg.write_offset != state.data.len() as i64 {
                    refused = Some(Status::invalid_argument(format!(
                        "fake upstream: write_offset {}, expected {}",
                        msg.write_offset,
                        state.data.len()
                    )));
                } else {
                    state.data.extend_from_slice(&msg.data);
                    state.finished = msg.finish_write;
                }
            });
            if let Some(e) = refused {
                return Err(e);
            }
            guard.add_received(msg.data.len() as u64);
            let committed = log.borrow().data.len() as i64;
            if msg.finish_write {
                return Ok(bs::WriteResponse {
                    committed_size: committed,
                });
            }
            match stream.message().await? {
                Some(next) => msg = next,
                None => {
                    return Ok(bs::WriteResponse {
                        committed_size: committed,
                    });
                }
            }
        }
    }

    /// QueryWriteStatus of a log name.
    pub(super) fn query_log(&self, name: &str) -> Result<bs::QueryWriteStatusResponse, Status> {
        match self.s.logs.lookup(name) {
            Some(LogName::Write(log)) => {
                let state = log.borrow();
                Ok(bs::QueryWriteStatusResponse {
                    committed_size: state.data.len() as i64,
                    complete: state.finished,
                })
            }
            Some(LogName::Read(_)) => Err(Status::invalid_argument(
                "fake upstream: QueryWriteStatus takes a log's write name",
            )),
            _ => Err(Status::not_found("fake upstream: no such log stream")),
        }
    }
}

#[tonic::async_trait]
impl LogStreamService for Svc {
    async fn create_log_stream(
        &self,
        request: Request<CreateLogStreamRequest>,
    ) -> Result<Response<LogStream>, Status> {
        self.unary(Method::CreateLogStream, request, |_, req| {
            let logs = &self.s.logs;
            let n = logs.next_id.fetch_add(1, Ordering::Relaxed) + 1;
            let name = match req.parent.as_str() {
                "" => format!("logstreams/{n}"),
                parent => format!("{parent}/logstreams/{n}"),
            };
            let write_resource_name = format!("{name}/secret-{n}-{:08x}", secret_salt());
            lock(&logs.streams).insert(name.clone(), watch::Sender::new(LogState::default()));
            lock(&logs.writers).insert(write_resource_name.clone(), name.clone());
            Ok(LogStream {
                name,
                write_resource_name,
            })
        })
        .await
    }
}

/// A value that differs between runs, so write names are not guessable.
fn secret_salt() -> u32 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    now.subsec_nanos() ^ (std::process::id() << 8)
}

/// Inspecting the fake's log streams.
impl FakeUpstream {
    /// ByteStream Reads of log streams in progress (ended or cancelled
    /// reads are not counted).
    pub fn active_log_readers(&self) -> usize {
        self.s.logs.readers.load(Ordering::Acquire)
    }

    /// Waits until exactly `n` log reads are in progress; false on timeout.
    pub async fn wait_active_log_readers(&self, n: usize, timeout: Duration) -> bool {
        poll_until(timeout, || self.active_log_readers() == n).await
    }

    /// The bytes of the log named `name` so far, and whether it is finalised.
    pub fn log_stream(&self, name: &str) -> Option<(Vec<u8>, bool)> {
        let streams = lock(&self.s.logs.streams);
        let state = streams.get(name)?.borrow().clone();
        Some((state.data, state.finished))
    }

    /// Number of log streams created.
    pub fn log_stream_count(&self) -> usize {
        lock(&self.s.logs.streams).len()
    }
}
