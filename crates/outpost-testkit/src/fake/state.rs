//! The fake's state: blobs, action results and partial uploads in memory,
//! everything the other modules share ([`Shared`]), digest checks, and the
//! seeding methods of [`FakeUpstream`].

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, MutexGuard};

use bazel_remote_apis::google::rpc::Status as RpcStatus;
use bytes::Bytes;
use prost::Message;
use tokio::sync::{Notify, mpsc};
use tonic::{Code, Status};

use super::FakeUpstream;
use super::compression::CompressionState;
use super::control::{Fault, Latency, PauseState};
use super::execution::ExecState;
use super::log::Log;
use super::logstream::Logs;
use super::net::{Conn, Net, NetCounters};
use crate::re;
use crate::workload::digest;
use re::digest_function::Value as DigestFunction;

/// Default size of a ByteStream ReadResponse.
const DEFAULT_READ_CHUNK: usize = 64 << 10;

/// What the fake stores.
#[derive(Default)]
pub(super) struct Data {
    pub(super) blobs: HashMap<(String, i64), Bytes>,
    /// (instance, action hash, action size) → result.
    pub(super) actions: HashMap<(String, String, i64), re::ActionResult>,
    /// Partial uploads by resource name.
    pub(super) uploads: HashMap<String, Vec<u8>>,
}

/// Everything the services, the prologue and the controls share.
pub(super) struct Shared {
    pub(super) addr: SocketAddr,
    pub(super) data: Mutex<Data>,
    pub(super) log: Mutex<Log>,
    pub(super) faults: Mutex<Vec<Fault>>,
    pub(super) latency: Mutex<Latency>,
    pub(super) capabilities: Mutex<re::ServerCapabilities>,
    pub(super) read_chunk: AtomicUsize,
    pub(super) in_flight: AtomicUsize,
    pub(super) max_in_flight: AtomicUsize,
    pub(super) pause: Mutex<PauseState>,
    pub(super) resumed: Notify,
    pub(super) parked: AtomicUsize,
    pub(super) net: Mutex<Net>,
    pub(super) counters: Arc<NetCounters>,
    pub(super) conn_tx: mpsc::Sender<io::Result<Conn>>,
    pub(super) exec: ExecState,
    pub(super) logs: Logs,
    pub(super) compression: CompressionState,
}

/// Locks `m`, ignoring poisoning (a panicking test must not wedge the fake).
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// Empty state serving on `addr`, accepted connections going to `conn_tx`.
    pub(super) fn new(
        addr: SocketAddr,
        conn_tx: mpsc::Sender<io::Result<Conn>>,
        capabilities: re::ServerCapabilities,
    ) -> Self {
        Shared {
            addr,
            data: Mutex::default(),
            log: Mutex::default(),
            faults: Mutex::default(),
            latency: Mutex::default(),
            capabilities: Mutex::new(capabilities),
            read_chunk: AtomicUsize::new(DEFAULT_READ_CHUNK),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            pause: Mutex::default(),
            resumed: Notify::new(),
            parked: AtomicUsize::new(0),
            net: Mutex::default(),
            counters: Arc::default(),
            conn_tx,
            exec: ExecState::default(),
            logs: Logs::default(),
            compression: CompressionState::default(),
        }
    }

    pub(super) fn caps(&self) -> re::ServerCapabilities {
        lock(&self.capabilities).clone()
    }

    pub(super) fn max_batch(&self) -> i64 {
        self.caps()
            .cache_capabilities
            .map(|c| c.max_batch_total_size_bytes)
            .unwrap_or(0)
    }

    /// INVALID_ARGUMENT unless `function` is 0 or advertised.
    pub(super) fn check_function(&self, function: i32) -> Result<(), Status> {
        if function == 0 {
            return Ok(());
        }
        let advertised = self
            .caps()
            .cache_capabilities
            .map(|c| c.digest_functions)
            .unwrap_or_default();
        if advertised.contains(&function) {
            Ok(())
        } else {
            Err(Status::invalid_argument(format!(
                "fake upstream: digest function {} is not supported",
                DigestFunction::try_from(function)
                    .map(|f| f.as_str_name().to_string())
                    .unwrap_or_else(|_| function.to_string())
            )))
        }
    }

    pub(super) fn blob(&self, d: &re::Digest) -> Option<Bytes> {
        if d.size_bytes == 0 {
            return Some(Bytes::new());
        }
        lock(&self.data)
            .blobs
            .get(&(d.hash.clone(), d.size_bytes))
            .cloned()
    }

    pub(super) fn has(&self, d: &re::Digest) -> bool {
        d.size_bytes == 0
            || lock(&self.data)
                .blobs
                .contains_key(&(d.hash.clone(), d.size_bytes))
    }

    pub(super) fn store(&self, d: &re::Digest, data: Bytes) {
        lock(&self.data)
            .blobs
            .insert((d.hash.clone(), d.size_bytes), data);
    }
}

pub(super) fn same(a: &re::Digest, b: &re::Digest) -> bool {
    a.hash == b.hash && a.size_bytes == b.size_bytes
}

pub(super) fn rpc_status(code: Code, message: &str) -> RpcStatus {
    RpcStatus {
        code: code as i32,
        message: message.to_string(),
        details: Vec::new(),
    }
}

/// The function a request names, or (UNKNOWN) the one its hash length
/// implies (REAPI); SHA-256 when neither says.
fn function_of(function: i32, d: &re::Digest) -> DigestFunction {
    match function {
        0 => crate::digests::by_hex_len(d.hash.len()).unwrap_or(DigestFunction::Sha256),
        f => DigestFunction::try_from(f).unwrap_or(DigestFunction::Unknown),
    }
}

pub(super) fn check_digest(d: &re::Digest, function: i32) -> Result<(), Status> {
    let hex_ok = !d.hash.is_empty()
        && d.hash
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    let length_ok = crate::digests::try_hash_hex(function_of(function, d), b"")
        .is_none_or(|empty| empty.len() == d.hash.len());
    if d.size_bytes < 0 || !hex_ok || !length_ok {
        return Err(Status::invalid_argument(format!(
            "fake upstream: invalid digest {}/{}",
            d.hash, d.size_bytes
        )));
    }
    Ok(())
}

/// Blobs are verified in every function the test kit computes
/// ([`crate::digests`]); others are taken on trust.
pub(super) fn verify(d: &re::Digest, function: i32, data: &[u8]) -> Result<(), Status> {
    if data.len() as i64 != d.size_bytes {
        return Err(Status::invalid_argument(format!(
            "fake upstream: size mismatch: got {} bytes for {}/{}",
            data.len(),
            d.hash,
            d.size_bytes
        )));
    }
    let actual = crate::digests::try_hash_hex(function_of(function, d), data);
    if actual.is_some_and(|hash| hash != d.hash) {
        return Err(Status::invalid_argument(format!(
            "fake upstream: hash mismatch for {}/{}",
            d.hash, d.size_bytes
        )));
    }
    Ok(())
}

/// Seeding and inspecting what the fake stores.
impl FakeUpstream {
    /// Stores `data` (as if uploaded) and returns its SHA-256 digest.
    pub fn put_blob(&self, data: impl Into<Bytes>) -> re::Digest {
        let data = data.into();
        let d = digest(&data);
        self.s.store(&d, data);
        d
    }

    /// Stores `data` under `digest` without checking (corrupt blobs).
    pub fn put_blob_unchecked(&self, digest: &re::Digest, data: impl Into<Bytes>) {
        self.s.store(digest, data.into());
    }

    /// Stores an encoded message (Directory, Tree, Action, Command…).
    pub fn put_message(&self, msg: &impl Message) -> re::Digest {
        self.put_blob(msg.encode_to_vec())
    }

    /// The stored bytes of a blob (the empty blob is always there).
    pub fn blob(&self, d: &re::Digest) -> Option<Bytes> {
        self.s.blob(d)
    }

    /// Whether a blob is stored (the empty blob always is).
    pub fn has_blob(&self, d: &re::Digest) -> bool {
        self.s.has(d)
    }

    /// Deletes a blob (as if the upstream evicted it); true if it was there.
    pub fn remove_blob(&self, d: &re::Digest) -> bool {
        lock(&self.s.data)
            .blobs
            .remove(&(d.hash.clone(), d.size_bytes))
            .is_some()
    }

    /// Number of stored blobs.
    pub fn blob_count(&self) -> usize {
        lock(&self.s.data).blobs.len()
    }

    /// Every stored blob's digest.
    pub fn blob_digests(&self) -> Vec<re::Digest> {
        lock(&self.s.data)
            .blobs
            .keys()
            .map(|(hash, size)| re::Digest {
                hash: hash.clone(),
                size_bytes: *size,
            })
            .collect()
    }

    /// Stores an action result as UpdateActionResult would.
    pub fn put_action_result(&self, instance: &str, action: &re::Digest, result: re::ActionResult) {
        lock(&self.s.data).actions.insert(
            (instance.to_string(), action.hash.clone(), action.size_bytes),
            result,
        );
    }

    /// The stored result, exactly as stored (nothing inlined).
    pub fn action_result(&self, instance: &str, action: &re::Digest) -> Option<re::ActionResult> {
        lock(&self.s.data)
            .actions
            .get(&(instance.to_string(), action.hash.clone(), action.size_bytes))
            .cloned()
    }

    /// Deletes an action result; true if it was there.
    pub fn remove_action_result(&self, instance: &str, action: &re::Digest) -> bool {
        lock(&self.s.data)
            .actions
            .remove(&(instance.to_string(), action.hash.clone(), action.size_bytes))
            .is_some()
    }

    /// Number of stored action results.
    pub fn action_result_count(&self) -> usize {
        lock(&self.s.data).actions.len()
    }

    /// Bytes committed so far of a partial ByteStream upload.
    pub fn partial_upload(&self, resource_name: &str) -> Option<usize> {
        lock(&self.s.data).uploads.get(resource_name).map(Vec::len)
    }

    /// Forgets every blob, action result and partial upload.
    pub fn clear_store(&self) {
        *lock(&self.s.data) = Data::default();
    }
}
