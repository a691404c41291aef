//! Shared fixture: an in-process server on 127.0.0.1:0 over a temporary
//! store ([`TestServer`]), the real binary as a child process
//! ([`ServerProcess`]), and small REAPI client helpers. Tests compute digests
//! with `sha2` themselves, so they do not trust the code under test.

pub mod fake_upstream;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
pub use bazel_remote_apis::google::bytestream as bs;
use futures::StreamExt;
use outpost::admin_proto::GetStatsResponse;
use outpost::config::Config;
use outpost::server::RunningServer;
use sha2::{Digest as _, Sha256};
use tonic::transport::Channel;
use tonic::{Code, Status};

pub type Cas = re::content_addressable_storage_client::ContentAddressableStorageClient<Channel>;
pub type ByteStream = bs::byte_stream_client::ByteStreamClient<Channel>;
pub type ActionCache = re::action_cache_client::ActionCacheClient<Channel>;
pub type Capabilities = re::capabilities_client::CapabilitiesClient<Channel>;
pub type Admin = outpost::admin_proto::admin_client::AdminClient<Channel>;

/// Client-side message limit: large enough for any answer the server may give.
const CLIENT_MAX_MESSAGE: usize = 64 << 20;

/// SHA-256 of the empty blob.
pub const EMPTY_HASH: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// Clients for every service on one channel.
pub trait Clients {
    /// The channel the clients share.
    fn channel(&self) -> Channel;

    /// ContentAddressableStorage, accepting answers up to 64 MiB.
    fn cas(&self) -> Cas {
        Cas::new(self.channel()).max_decoding_message_size(CLIENT_MAX_MESSAGE)
    }
    /// ByteStream, accepting answers up to 64 MiB.
    fn bytestream(&self) -> ByteStream {
        ByteStream::new(self.channel()).max_decoding_message_size(CLIENT_MAX_MESSAGE)
    }
    /// ActionCache, accepting answers up to 64 MiB.
    fn action_cache(&self) -> ActionCache {
        ActionCache::new(self.channel()).max_decoding_message_size(CLIENT_MAX_MESSAGE)
    }
    /// Capabilities.
    fn capabilities(&self) -> Capabilities {
        Capabilities::new(self.channel())
    }
    /// Outpost's Admin service (stats).
    fn admin(&self) -> Admin {
        Admin::new(self.channel())
    }
}

impl Clients for Channel {
    fn channel(&self) -> Channel {
        self.clone()
    }
}

/// The server counters and occupancy.
pub async fn stats(clients: &impl Clients) -> GetStatsResponse {
    clients
        .admin()
        .get_stats(outpost::admin_proto::GetStatsRequest {})
        .await
        .expect("GetStats")
        .into_inner()
}

/// A real server running inside the test process over a temporary store.
pub struct TestServer {
    server: RunningServer,
    /// The configuration it runs with (and restarts with).
    config: Config,
    /// Owns the data directory; deleted when the test ends.
    dir: tempfile::TempDir,
    channel: Channel,
}

impl Clients for TestServer {
    fn channel(&self) -> Channel {
        self.channel.clone()
    }
}

impl TestServer {
    /// A server with [`Config::for_tests`].
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// A server with [`Config::for_tests`] adjusted by `adjust`.
    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = Config::for_tests(&dir.path().join("data"));
        adjust(&mut config);
        Self::start_in(dir, config).await
    }

    async fn start_in(dir: tempfile::TempDir, config: Config) -> Self {
        let server = RunningServer::start(&config).await.expect("server starts");
        let channel = outpost::client::connect(&format!("grpc://{}", server.addr))
            .await
            .expect("client connects");
        TestServer {
            server,
            config,
            dir,
            channel,
        }
    }

    /// The TCP address it serves on (for clients with their own connection).
    pub fn addr(&self) -> SocketAddr {
        self.server.addr
    }

    /// The store's directory.
    pub fn data_dir(&self) -> &Path {
        &self.config.data_dir
    }

    /// Stops gracefully and starts again over the same store.
    pub async fn restart(self) -> Self {
        let TestServer {
            server,
            config,
            dir,
            channel,
        } = self;
        drop(channel);
        server.stop().await.expect("server stops cleanly");
        Self::start_in(dir, config).await
    }

    /// Stops gracefully.
    pub async fn stop(self) {
        drop(self.channel);
        self.server.stop().await.expect("server stops cleanly");
    }

    /// Asserts that the store holds nothing: no blob, no action result, no
    /// upload debris in `tmp/`, no blob file.
    pub async fn assert_nothing_stored(&self) {
        let s = stats(self).await;
        assert_eq!(
            (
                s.blob_count,
                s.blob_bytes,
                s.action_result_count,
                s.blobs_written
            ),
            (0, 0, 0, 0),
            "the store must stay empty"
        );
        assert_eq!(
            list_files(&self.data_dir().join("tmp")),
            Vec::<PathBuf>::new()
        );
        assert_eq!(
            list_files(&self.data_dir().join("blobs")),
            Vec::<PathBuf>::new()
        );
    }

    /// Asserts that the server still answers: a blob goes in and comes back.
    pub async fn assert_still_serves(&self) {
        let data = blob(0x5e11e5, 1000);
        let d = digest(&data);
        assert_eq!(
            batch_update(&mut self.cas(), "", &[&data]).await,
            vec![Code::Ok]
        );
        let (read, _) = read_blob(&mut self.bytestream(), &read_name("", &d), 0, 0)
            .await
            .expect("read after bad input");
        assert_eq!(read, data);
    }
}

/// Every regular file under `dir`, recursively, sorted (empty if `dir` is absent).
pub fn list_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                pending.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// The real `outpost` binary, serving on loopback TCP over `data_dir`.
pub struct ServerProcess {
    child: Child,
    channel: Channel,
    /// Where the process's stderr goes (shown if it fails to start).
    log: PathBuf,
}

impl Clients for ServerProcess {
    fn channel(&self) -> Channel {
        self.channel.clone()
    }
}

impl ServerProcess {
    /// Starts the binary and waits until it answers GetCapabilities.
    pub async fn spawn(data_dir: &Path, log: &Path) -> Self {
        static SPAWNED: AtomicU64 = AtomicU64::new(0);
        for _attempt in 0..3 {
            // A port that was free a moment ago; retried if someone took it.
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("free port")
                .port();
            let listen = format!("127.0.0.1:{port}");
            // An odd quota identifies this process, so that a server someone
            // else started on the same port is never mistaken for ours.
            let quota = (10u64 << 30)
                + u64::from(std::process::id()) * 1000
                + SPAWNED.fetch_add(1, Ordering::Relaxed);
            let mut child = Command::new(env!("CARGO_BIN_EXE_outpost"))
                .arg("serve")
                .args(["--listen", &listen, "--no-unix-socket", "--data-dir"])
                .arg(data_dir)
                .args(["--quota", &quota.to_string()])
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(log).expect("log file"))
                .spawn()
                .expect("spawn outpost");
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if child.try_wait().expect("try_wait").is_some() {
                    break; // exited: maybe the port was taken; try another
                }
                if let Ok(channel) = outpost::client::connect(&format!("grpc://{listen}")).await
                    && let Ok(stats) = channel
                        .admin()
                        .get_stats(outpost::admin_proto::GetStatsRequest {})
                        .await
                {
                    if stats.into_inner().quota_bytes != quota {
                        break; // another server holds the port
                    }
                    return ServerProcess {
                        child,
                        channel,
                        log: log.to_path_buf(),
                    };
                }
                assert!(Instant::now() < deadline, "outpost did not start in time");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!(
            "outpost failed to start: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }

    /// The peak resident set size of the process (VmHWM), in bytes.
    pub fn peak_rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("read /proc/PID/status");
        let line = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .expect("VmHWM line");
        let kib: u64 = line
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .expect("VmHWM value");
        kib * 1024
    }

    /// SIGKILLs the process and reaps it.
    pub fn kill(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reap");
    }

    /// The process's stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Fills `buf` with xorshift64 output: fast, deterministic, incompressible.
pub fn fill(state: &mut u64, buf: &mut [u8]) {
    for chunk in buf.chunks_mut(8) {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
}

/// `len` pseudo-random bytes; different seeds give different blobs.
pub fn blob(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = vec![0u8; len];
    fill(&mut state, &mut out);
    out
}

/// Lower-case hex SHA-256.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// The REAPI digest of `data`.
pub fn digest(data: &[u8]) -> re::Digest {
    re::Digest {
        hash: sha256_hex(data),
        size_bytes: data.len() as i64,
    }
}

/// A digest from its parts (for malformed ones).
pub fn raw_digest(hash: &str, size: i64) -> re::Digest {
    re::Digest {
        hash: hash.to_string(),
        size_bytes: size,
    }
}

/// `{instance}/blobs/{hash}/{size}`.
pub fn read_name(instance: &str, d: &re::Digest) -> String {
    let blob = format!("blobs/{}/{}", d.hash, d.size_bytes);
    if instance.is_empty() {
        blob
    } else {
        format!("{instance}/{blob}")
    }
}

/// `{instance}/uploads/{fresh uuid}/blobs/{hash}/{size}`.
pub fn write_name(instance: &str, d: &re::Digest) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let uuid = format!(
        "3f0c2a8e-0000-4000-8000-{:012x}",
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let upload = format!("uploads/{uuid}/blobs/{}/{}", d.hash, d.size_bytes);
    if instance.is_empty() {
        upload
    } else {
        format!("{instance}/{upload}")
    }
}

/// The WriteRequests that send `data` from `offset` in `chunk`-byte pieces;
/// the resource name goes in the first one only.
pub fn write_requests(
    resource: &str,
    data: &[u8],
    offset: usize,
    chunk: usize,
    finish: bool,
) -> Vec<bs::WriteRequest> {
    let mut out: Vec<bs::WriteRequest> = data[offset..]
        .chunks(chunk)
        .enumerate()
        .map(|(i, piece)| bs::WriteRequest {
            resource_name: if i == 0 {
                resource.to_string()
            } else {
                String::new()
            },
            write_offset: (offset + i * chunk) as i64,
            finish_write: false,
            data: piece.to_vec(),
        })
        .collect();
    if out.is_empty() {
        out.push(bs::WriteRequest {
            resource_name: resource.to_string(),
            write_offset: offset as i64,
            finish_write: false,
            data: Vec::new(),
        });
    }
    out.last_mut().expect("at least one").finish_write = finish;
    out
}

/// Sends `requests` as one Write call and returns `committed_size`.
pub async fn write(bs: &mut ByteStream, requests: Vec<bs::WriteRequest>) -> Result<i64, Status> {
    Ok(bs
        .write(futures::stream::iter(requests))
        .await?
        .into_inner()
        .committed_size)
}

/// Uploads `data` whole through ByteStream Write in `chunk`-byte pieces.
pub async fn upload(
    bs: &mut ByteStream,
    instance: &str,
    data: &[u8],
    chunk: usize,
) -> Result<i64, Status> {
    let name = write_name(instance, &digest(data));
    write(bs, write_requests(&name, data, 0, chunk, true)).await
}

/// Reads `resource` through ByteStream; returns the bytes and the size of
/// each ReadResponse.
pub async fn read_blob(
    bs: &mut ByteStream,
    resource: &str,
    offset: i64,
    limit: i64,
) -> Result<(Vec<u8>, Vec<usize>), Status> {
    let mut stream = bs
        .read(bs::ReadRequest {
            resource_name: resource.to_string(),
            read_offset: offset,
            read_limit: limit,
        })
        .await?
        .into_inner();
    let mut data = Vec::new();
    let mut chunks = Vec::new();
    while let Some(resp) = stream.message().await? {
        chunks.push(resp.data.len());
        data.extend_from_slice(&resp.data);
    }
    Ok((data, chunks))
}

/// Reads a blob through ByteStream, hashing as it streams; returns its digest.
pub async fn read_digest(bs: &mut ByteStream, d: &re::Digest) -> Result<re::Digest, Status> {
    let mut stream = bs
        .read(bs::ReadRequest {
            resource_name: read_name("", d),
            read_offset: 0,
            read_limit: 0,
        })
        .await?
        .into_inner();
    let mut hasher = Sha256::new();
    let mut size = 0i64;
    while let Some(resp) = stream.message().await? {
        hasher.update(&resp.data);
        size += resp.data.len() as i64;
    }
    Ok(re::Digest {
        hash: hex::encode(hasher.finalize()),
        size_bytes: size,
    })
}

/// FindMissingBlobs (SHA-256, instance `""`).
pub async fn find_missing(cas: &mut Cas, digests: &[re::Digest]) -> Vec<re::Digest> {
    cas.find_missing_blobs(re::FindMissingBlobsRequest {
        instance_name: String::new(),
        blob_digests: digests.to_vec(),
        digest_function: 0,
    })
    .await
    .expect("FindMissingBlobs")
    .into_inner()
    .missing_blob_digests
}

/// The code of a per-entry status in a Batch* response.
pub fn entry_code(status: &Option<bazel_remote_apis::google::rpc::Status>) -> Code {
    Code::from(status.as_ref().expect("entry has a status").code)
}

/// BatchUpdateBlobs with correct digests; returns each entry's code.
pub async fn batch_update(cas: &mut Cas, instance: &str, blobs: &[&[u8]]) -> Vec<Code> {
    let requests = blobs
        .iter()
        .map(|data| (digest(data), data.to_vec()))
        .collect();
    batch_update_raw(cas, instance, requests)
        .await
        .expect("BatchUpdateBlobs")
}

/// BatchUpdateBlobs with the given (digest, data) pairs.
pub async fn batch_update_raw(
    cas: &mut Cas,
    instance: &str,
    entries: Vec<(re::Digest, Vec<u8>)>,
) -> Result<Vec<Code>, Status> {
    let sent: Vec<re::Digest> = entries.iter().map(|(d, _)| d.clone()).collect();
    let resp = cas
        .batch_update_blobs(re::BatchUpdateBlobsRequest {
            instance_name: instance.to_string(),
            requests: entries
                .into_iter()
                .map(|(digest, data)| re::batch_update_blobs_request::Request {
                    digest: Some(digest),
                    data,
                    compressor: 0,
                })
                .collect(),
            digest_function: 0,
        })
        .await?
        .into_inner();
    let echoed: Vec<re::Digest> = resp
        .responses
        .iter()
        .map(|r| r.digest.clone().expect("entry names its digest"))
        .collect();
    assert_eq!(echoed, sent, "one response per request, in order");
    Ok(resp
        .responses
        .iter()
        .map(|r| entry_code(&r.status))
        .collect())
}

/// Asserts that `result` failed with `code`.
#[track_caller]
pub fn assert_code<T: std::fmt::Debug>(result: Result<T, Status>, code: Code) {
    match result {
        Ok(v) => panic!("expected {code:?}, got Ok({v:?})"),
        Err(status) => assert_eq!(status.code(), code, "unexpected status: {status:?}"),
    }
}

/// Collects a stream of results, for GetTree.
pub async fn collect<T>(mut stream: tonic::Streaming<T>) -> Result<Vec<T>, Status> {
    let mut out = Vec::new();
    while let Some(item) = stream.next().await {
        out.push(item?);
    }
    Ok(out)
}
