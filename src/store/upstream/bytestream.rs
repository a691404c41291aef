//! Blobs too large for a batch travel over ByteStream: a read that resumes
//! where it broke, and an upload fed chunk by chunk.

use std::sync::Arc;

use async_trait::async_trait;
use bazel_remote_apis::google::bytestream::{
    ReadRequest, ReadResponse, WriteRequest, WriteResponse,
};
use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use crate::context::RequestContext;
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::reapi::resource::ResourceName;
use crate::stats::{Stats, UpstreamMethod};
use crate::store::{BlobWriter, ChunkStream};
use crate::upstream::Upstream;
use crate::upstream::client::is_transient;

/// Most times a broken upstream read is resumed at the byte it stopped at.
const MAX_READ_RESUMES: u32 = 3;

/// Streams `[offset, offset + limit)` of a blob from the upstream, in a call
/// slot held until the stream ends (for a client, the slot counts the
/// stream as client work until then). A stream that breaks is resumed (see
/// [`ResumingRead`]); one silent for a whole `rpc_timeout` counts as broken.
pub async fn read(
    upstream: &Arc<Upstream>,
    ctx: &RequestContext,
    digest: &Digest,
    offset: u64,
    limit: u64,
) -> Result<ChunkStream> {
    let end = digest.read_end(offset, limit);
    let permit = upstream.slot(ctx, UpstreamMethod::ByteStreamRead).await?;
    let reader = ResumingRead {
        upstream: upstream.clone(),
        ctx: ctx.clone(),
        digest: *digest,
        position: offset,
        end,
        resumes: 0,
    };
    let first = reader.open().await?;
    let state = Some((reader, first, permit));
    Ok(Box::pin(futures::stream::unfold(
        state,
        |state| async move {
            let (mut reader, mut stream, permit) = state?;
            let idle = reader.upstream.config().rpc_timeout;
            loop {
                let next = tokio::time::timeout(idle, stream.message())
                    .await
                    .unwrap_or_else(|_| {
                        Err(Status::unavailable(format!(
                            "upstream sent no data for {}s",
                            idle.as_secs_f32()
                        )))
                    });
                match next {
                    Ok(Some(message)) => {
                        let n = message.data.len() as u64;
                        reader.position += n;
                        Stats::add(&reader.upstream.stats().upstream_bytes_received, n);
                        let chunk = Ok(Bytes::from(message.data));
                        return Some((chunk, Some((reader, stream, permit))));
                    }
                    Ok(None) => return None,
                    Err(status) => {
                        reader.upstream.record_error(&status);
                        match reader.resume(&status).await {
                            Ok(next) => stream = next,
                            Err(e) => return Some((Err(e), None)),
                        }
                    }
                }
            }
        },
    )))
}

/// A ByteStream read from the upstream that picks up where it stopped when
/// the stream breaks.
struct ResumingRead {
    /// Where the blob is read from.
    upstream: Arc<Upstream>,
    /// The reader's instance and headers, carried by every (re)opened Read.
    ctx: RequestContext,
    /// The blob being read.
    digest: Digest,
    /// The next byte to receive.
    position: u64,
    /// One past the last byte wanted.
    end: u64,
    /// Resumes so far, bounded by [`MAX_READ_RESUMES`].
    resumes: u32,
}

impl ResumingRead {
    /// Starts a Read for `[position, end)` (with the usual retries).
    async fn open(&self) -> Result<Streaming<ReadResponse>> {
        let up = &self.upstream;
        let message = ReadRequest {
            resource_name: ResourceName::read(&up.instance(&self.ctx), self.digest).to_string(),
            read_offset: self.position as i64,
            read_limit: (self.end - self.position) as i64,
        };
        // The deadline covers the call's start only: the stream itself may
        // legitimately take longer than rpc_timeout.
        let timeout = up.config().rpc_timeout;
        up.call(UpstreamMethod::ByteStreamRead, || {
            let mut bytestream = up.bytestream(&self.ctx);
            let request = up.request(&self.ctx, message.clone());
            async move {
                tokio::time::timeout(timeout, bytestream.read(request))
                    .await
                    .unwrap_or_else(|_| Err(Status::deadline_exceeded("Timeout expired")))
            }
        })
        .await
    }

    /// After a mid-stream failure: a new Read from the current position, if
    /// the failure is transient and resumes are left.
    async fn resume(&mut self, status: &Status) -> Result<Streaming<ReadResponse>> {
        if !is_transient(status) || self.resumes >= MAX_READ_RESUMES || self.position >= self.end {
            return Err(self.upstream.error(status));
        }
        self.resumes += 1;
        tracing::debug!(
            "upstream read of {} broke at byte {}: {}; resuming",
            self.digest,
            self.position,
            status.message()
        );
        self.open().await
    }
}

/// A unique upload id (the spec asks for a UUID; any unique string works).
fn upload_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("outpost-{:x}-{nanos:x}-{n:x}", std::process::id())
}

/// A ByteStream upload to the upstream, fed chunk by chunk.
pub struct UpstreamWriter {
    /// Where the blob is written, and whose errors are reported.
    upstream: Arc<Upstream>,
    /// The blob being written, to check the committed size against.
    digest: Digest,
    /// The upload's resource name, sent with the first message only.
    resource: String,
    /// Feeds the call; `None` once the call has ended.
    tx: Option<mpsc::Sender<WriteRequest>>,
    /// The Write call, in its own task so chunks can be fed from here; it
    /// ends with the upload (aborted if the writer is dropped unfinished).
    call: JoinHandle<std::result::Result<WriteResponse, Status>>,
    /// Bytes handed to the call so far (the next message's write offset).
    sent: u64,
}

impl UpstreamWriter {
    /// Opens the Write call for `digest` (in a call slot held until it ends,
    /// counting as client work for a client's write).
    pub async fn start(up: &Arc<Upstream>, ctx: &RequestContext, digest: &Digest) -> Result<Self> {
        up.check_health()?;
        let permit = up.slot(ctx, UpstreamMethod::ByteStreamWrite).await?;
        up.stats().upstream_call(UpstreamMethod::ByteStreamWrite);
        let (tx, rx) = mpsc::channel(4);
        let request = up.request(ctx, ReceiverStream::new(rx));
        let mut bytestream = up.bytestream(ctx);
        let call = tokio::spawn(async move {
            let _permit = permit;
            bytestream.write(request).await.map(|r| r.into_inner())
        });
        Ok(UpstreamWriter {
            upstream: up.clone(),
            digest: *digest,
            resource: ResourceName::upload(&up.instance(ctx), &upload_id(), *digest).to_string(),
            tx: Some(tx),
            call,
            sent: 0,
        })
    }

    async fn send(&mut self, data: Vec<u8>, finish: bool) -> Result<()> {
        let Some(tx) = &self.tx else {
            return Ok(()); // the upstream already completed the write early
        };
        let len = data.len() as u64;
        let message = WriteRequest {
            resource_name: if self.sent == 0 {
                self.resource.clone()
            } else {
                String::new()
            },
            write_offset: self.sent as i64,
            finish_write: finish,
            data,
        };
        let timeout = self.upstream.config().rpc_timeout;
        match tokio::time::timeout(timeout, tx.send(message)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                // The call ended: either early completion or an error; commit tells.
                self.tx = None;
                return Ok(());
            }
            Err(_) => {
                return Err(Error::DeadlineExceeded(format!(
                    "upstream {} accepted no data for {}s",
                    self.upstream.config().uri,
                    timeout.as_secs_f32()
                )));
            }
        }
        self.sent += len;
        Stats::add(&self.upstream.stats().upstream_bytes_sent, len);
        Ok(())
    }
}

#[async_trait]
impl BlobWriter for UpstreamWriter {
    async fn write(&mut self, data: Bytes) -> Result<()> {
        self.send(data.to_vec(), false).await
    }

    fn committed_size(&self) -> u64 {
        self.sent
    }

    async fn commit(mut self: Box<Self>) -> Result<()> {
        self.send(Vec::new(), true).await?;
        self.tx = None;
        let timeout = self.upstream.config().rpc_timeout;
        let result = tokio::time::timeout(timeout, &mut self.call)
            .await
            .map_err(|_| {
                Error::DeadlineExceeded(format!(
                    "upstream {} did not confirm the write of {} within {}s",
                    self.upstream.config().uri,
                    self.digest,
                    timeout.as_secs_f32()
                ))
            })?
            .map_err(|e| Error::Internal(format!("upstream write task failed: {e}")))?;
        match result {
            Ok(response) if response.committed_size == self.digest.size as i64 => Ok(()),
            Ok(response) => Err(Error::Unavailable(format!(
                "upstream committed {} of {} bytes of {}",
                response.committed_size, self.digest.size, self.digest
            ))),
            Err(status) => {
                self.upstream.record_error(&status);
                Err(self.upstream.error(&status))
            }
        }
    }
}

impl Drop for UpstreamWriter {
    fn drop(&mut self) {
        // An abandoned write must not complete upstream: cancel the call.
        if !self.call.is_finished() {
            self.call.abort();
        }
    }
}
