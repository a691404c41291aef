//! REAPI client helpers over a plain tonic [`Channel`]: resource names,
//! ByteStream reads and writes, FindMissingBlobs and BatchUpdateBlobs,
//! Remote Logstream (create, a [`LogWriter`] that writes piece by piece,
//! tailing reads), and the assertions tests make on statuses; zstd
//! `compressed-blobs` names, writes and batch entries in [`compressed`].

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bazel_remote_apis::build::bazel::remote::logstream::v1::{
    CreateLogStreamRequest, LogStream, log_stream_service_client::LogStreamServiceClient,
};
use futures::StreamExt;
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status, Streaming};

use crate::workload::digest;
use crate::{bs, re};

pub mod compressed;
pub use compressed::*;

/// A ContentAddressableStorage client.
pub type Cas = re::content_addressable_storage_client::ContentAddressableStorageClient<Channel>;
/// A ByteStream client.
pub type ByteStream = bs::byte_stream_client::ByteStreamClient<Channel>;
/// An ActionCache client.
pub type ActionCache = re::action_cache_client::ActionCacheClient<Channel>;
/// A Capabilities client.
pub type Capabilities = re::capabilities_client::CapabilitiesClient<Channel>;
/// A Remote Logstream client.
pub type LogStreams = LogStreamServiceClient<Channel>;

/// Client-side message limit: large enough for any answer the server may give.
pub const CLIENT_MAX_MESSAGE: usize = 64 << 20;

/// SHA-256 of the empty blob.
pub const EMPTY_HASH: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// An endpoint for `addr` tuned like Outpost's own client (large HTTP/2
/// windows and frames), so transfers are not limited by the test client.
pub fn endpoint(addr: SocketAddr) -> Endpoint {
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("a socket address is a valid URI")
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .initial_stream_window_size(16 << 20)
        .initial_connection_window_size(32 << 20)
        .max_frame_size(1 << 20)
}

/// Clients for every REAPI service on one channel.
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
    /// Remote Logstream.
    fn logstreams(&self) -> LogStreams {
        LogStreams::new(self.channel())
    }
}

impl Clients for Channel {
    fn channel(&self) -> Channel {
        self.clone()
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

/// The WriteRequests that upload `data` whole in `chunk`-byte pieces,
/// made one at a time as the stream is polled (no copy of the whole blob up
/// front); the resource name goes in the first one only.
pub fn write_stream<D>(
    resource: String,
    data: D,
    chunk: usize,
) -> impl futures::Stream<Item = bs::WriteRequest> + Send + 'static
where
    D: std::ops::Deref + Send + 'static,
    D::Target: AsRef<[u8]>,
{
    let size = (*data).as_ref().len();
    futures::stream::iter((0..size).step_by(chunk).map(move |offset| {
        let end = (offset + chunk).min(size);
        bs::WriteRequest {
            resource_name: if offset == 0 {
                resource.clone()
            } else {
                String::new()
            },
            write_offset: offset as i64,
            finish_write: end == size,
            data: (*data).as_ref()[offset..end].to_vec(),
        }
    }))
}

/// QueryWriteStatus of the upload `name`: `(committed_size, complete)`.
pub async fn write_status(bs: &mut ByteStream, name: &str) -> Result<(i64, bool), Status> {
    let status = bs
        .query_write_status(bs::QueryWriteStatusRequest {
            resource_name: name.to_string(),
        })
        .await?
        .into_inner();
    Ok((status.committed_size, status.complete))
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

/// Every message of a stream until it ends, and how it ended (for
/// Execute and WaitExecution, whose end matters as much as their messages).
pub async fn drain<T>(mut stream: tonic::Streaming<T>) -> (Vec<T>, Result<(), Status>) {
    let mut out = Vec::new();
    loop {
        match stream.message().await {
            Ok(Some(item)) => out.push(item),
            Ok(None) => return (out, Ok(())),
            Err(e) => return (out, Err(e)),
        }
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

/// CreateLogStream under `parent`.
pub async fn create_log_stream(client: &mut LogStreams, parent: &str) -> Result<LogStream, Status> {
    Ok(client
        .create_log_stream(CreateLogStreamRequest {
            parent: parent.to_string(),
        })
        .await?
        .into_inner())
}

/// Opens a ByteStream Read of `resource` (a log stream's name) and returns
/// its messages as they come.
pub async fn open_read(
    bs: &mut ByteStream,
    resource: &str,
    offset: i64,
) -> Result<Streaming<bs::ReadResponse>, Status> {
    Ok(bs
        .read(bs::ReadRequest {
            resource_name: resource.to_string(),
            read_offset: offset,
            read_limit: 0,
        })
        .await?
        .into_inner())
}

/// Reads from `stream` until `n` bytes have arrived (panics after
/// `timeout`, or if the stream ends or fails first).
pub async fn read_exactly(
    stream: &mut Streaming<bs::ReadResponse>,
    n: usize,
    timeout: Duration,
) -> Vec<u8> {
    let mut out = Vec::new();
    let reading = async {
        while out.len() < n {
            match stream.message().await {
                Ok(Some(msg)) => out.extend_from_slice(&msg.data),
                Ok(None) => panic!("the read ended after {} of {n} bytes", out.len()),
                Err(e) => panic!("the read failed after {} of {n} bytes: {e:?}", out.len()),
            }
        }
    };
    tokio::time::timeout(timeout, reading)
        .await
        .unwrap_or_else(|_| panic!("fewer than {n} bytes within {timeout:?}"));
    out
}

/// A ByteStream Write kept open, sending one piece at a time (a log
/// writer): the call runs in a task, the pieces go through a channel.
pub struct LogWriter {
    tx: mpsc::Sender<bs::WriteRequest>,
    resource: Option<String>,
    offset: i64,
    call: JoinHandle<Result<i64, Status>>,
}

impl LogWriter {
    /// Starts a Write of `resource` (a log stream's write name).
    pub fn start(mut bs: ByteStream, resource: &str) -> Self {
        let (tx, rx) = mpsc::channel(1);
        let call = tokio::spawn(async move {
            Ok(bs
                .write(ReceiverStream::new(rx))
                .await?
                .into_inner()
                .committed_size)
        });
        LogWriter {
            tx,
            resource: Some(resource.to_string()),
            offset: 0,
            call,
        }
    }

    /// Sends `data` (not finishing the write).
    pub async fn send(&mut self, data: &[u8]) {
        self.push(data, false).await;
    }

    /// Sends `data` with `finish_write` and returns the committed size.
    pub async fn finish(mut self, data: &[u8]) -> Result<i64, Status> {
        self.push(data, true).await;
        drop(self.tx);
        self.call.await.expect("the Write task")
    }

    async fn push(&mut self, data: &[u8], finish: bool) {
        let request = bs::WriteRequest {
            resource_name: self.resource.take().unwrap_or_default(),
            write_offset: self.offset,
            finish_write: finish,
            data: data.to_vec(),
        };
        self.offset += data.len() as i64;
        // A send fails once the call has ended; the call's result says why.
        let _ = self.tx.send(request).await;
    }
}
