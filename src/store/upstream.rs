//! The upstream REAPI server as a [`BlobStore`] and [`ActionResultStore`].
//!
//! Small requests from concurrent clients are merged by group-commit
//! batchers: FindMissingBlobs digests, small-blob reads (BatchReadBlobs) and
//! small-blob writes (BatchUpdateBlobs), each within the upstream's limits.
//! Large blobs go over ByteStream. Data read from the upstream is verified
//! before it is handed on.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bazel_remote_apis::build::bazel::remote::execution::v2::{
    ActionResult, BatchReadBlobsRequest, BatchUpdateBlobsRequest, FindMissingBlobsRequest,
    GetActionResultRequest, UpdateActionResultRequest, batch_update_blobs_request,
};
use bazel_remote_apis::google::bytestream::{ReadRequest, WriteRequest, WriteResponse};
use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};

use crate::context::RequestContext;
use crate::digest::{Digest, verify};
use crate::error::{Error, Result};
use crate::stats::{Stats, UpstreamMethod};
use crate::store::{ActionKey, ActionResultStore, BlobStore, BlobWriter, ChunkStream};
use crate::upstream::Upstream;
use crate::upstream::batcher::{Batcher, Limits, split_by_weight};
use crate::upstream::client::is_transient;

/// Digests per FindMissingBlobs call (about 0.8 MB of request).
const FMB_MAX_DIGESTS: usize = 10_000;
/// Batched calls of one kind in flight per (instance, credentials).
const BATCH_CALLS_IN_FLIGHT: usize = 4;

/// One batcher per group key (instance + credentials), created on first use.
struct KeyedBatchers<T, R> {
    batchers: Mutex<HashMap<String, Arc<Batcher<T, R>>>>,
    make: Box<dyn Fn() -> Batcher<T, R> + Send + Sync>,
}

impl<T: Send + 'static, R: Send + 'static> KeyedBatchers<T, R> {
    fn new(make: impl Fn() -> Batcher<T, R> + Send + Sync + 'static) -> Self {
        KeyedBatchers {
            batchers: Mutex::new(HashMap::new()),
            make: Box::new(make),
        }
    }

    async fn submit(&self, ctx: &RequestContext, items: Vec<T>) -> Result<Vec<R>> {
        let batcher = {
            let mut map = self.batchers.lock().unwrap_or_else(|e| e.into_inner());
            map.entry(ctx.group_key())
                .or_insert_with(|| Arc::new((self.make)()))
                .clone()
        };
        batcher.submit(ctx, items).await
    }
}

/// The upstream CAS and action cache.
pub struct UpstreamStore {
    upstream: Arc<Upstream>,
    /// FindMissingBlobs: digest → missing?
    find_missing: KeyedBatchers<Digest, bool>,
    /// Small reads: digest → bytes.
    reads: KeyedBatchers<Digest, Result<Bytes>>,
    /// Small writes: (digest, bytes) → stored?
    writes: KeyedBatchers<(Digest, Bytes), Result<()>>,
}

fn read_resource(instance: &str, digest: &Digest) -> String {
    let blob = format!("blobs/{}/{}", digest.hash_hex(), digest.size);
    if instance.is_empty() {
        blob
    } else {
        format!("{instance}/{blob}")
    }
}

fn write_resource(instance: &str, digest: &Digest) -> String {
    let upload = format!(
        "uploads/{}/blobs/{}/{}",
        upload_id(),
        digest.hash_hex(),
        digest.size
    );
    if instance.is_empty() {
        upload
    } else {
        format!("{instance}/{upload}")
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

impl UpstreamStore {
    /// The upstream's CAS and action cache, with batching.
    pub fn new(upstream: Arc<Upstream>) -> Self {
        let limits = |max_items, max_weight| Limits {
            max_items,
            max_weight,
            max_in_flight: BATCH_CALLS_IN_FLIGHT,
        };
        let batch_bytes = upstream.batch_limit();
        let up = upstream.clone();
        let find_missing = KeyedBatchers::new(move || {
            let up = up.clone();
            Batcher::new(
                limits(FMB_MAX_DIGESTS, u64::MAX),
                |_| 0,
                move |ctx, digests| {
                    let up = up.clone();
                    async move { flush_find_missing(&up, ctx, digests).await }
                },
            )
        });
        let up = upstream.clone();
        let reads = KeyedBatchers::new(move || {
            let up = up.clone();
            Batcher::new(
                limits(usize::MAX, batch_bytes),
                |d: &Digest| d.size,
                move |ctx, digests| {
                    let up = up.clone();
                    async move { flush_reads(&up, ctx, digests).await }
                },
            )
        });
        let up = upstream.clone();
        let writes = KeyedBatchers::new(move || {
            let up = up.clone();
            Batcher::new(
                limits(usize::MAX, batch_bytes),
                |(d, _): &(Digest, Bytes)| d.size,
                move |ctx, blobs| {
                    let up = up.clone();
                    async move { flush_writes(&up, ctx, blobs).await }
                },
            )
        });
        UpstreamStore {
            upstream,
            find_missing,
            reads,
            writes,
        }
    }

    /// The connection this store uses.
    pub fn upstream(&self) -> &Arc<Upstream> {
        &self.upstream
    }
}

async fn flush_find_missing(
    up: &Upstream,
    ctx: RequestContext,
    digests: Vec<Digest>,
) -> Result<Vec<bool>> {
    let unique: Vec<Digest> = {
        let mut seen = HashSet::new();
        digests
            .iter()
            .filter(|d| seen.insert(**d))
            .copied()
            .collect()
    };
    let stats = up.stats();
    let mut missing = HashSet::new();
    for chunk in unique.chunks(FMB_MAX_DIGESTS) {
        Stats::add(&stats.fmb_batches, 1);
        Stats::add(&stats.fmb_batched_digests, chunk.len() as u64);
        let message = FindMissingBlobsRequest {
            instance_name: up.instance(&ctx),
            blob_digests: chunk.iter().map(Digest::to_proto).collect(),
            digest_function: chunk[0].function.to_proto(),
        };
        let response = up
            .unary(UpstreamMethod::FindMissingBlobs, || {
                let mut cas = up.cas();
                let request = up.unary_request(&ctx, message.clone());
                async move { cas.find_missing_blobs(request).await }
            })
            .await?;
        for d in response.missing_blob_digests {
            missing.insert((d.hash, d.size_bytes));
        }
    }
    Ok(digests
        .iter()
        .map(|d| missing.contains(&(d.hash_hex(), d.size as i64)))
        .collect())
}

/// BatchReadBlobs for merged reads, in calls within the upstream's limit
/// (looked up now: the capabilities may have arrived since start-up).
async fn flush_reads(
    up: &Upstream,
    ctx: RequestContext,
    digests: Vec<Digest>,
) -> Result<Vec<Result<Bytes>>> {
    let mut out = Vec::with_capacity(digests.len());
    for run in split_by_weight(digests, up.batch_limit(), |d| d.size) {
        out.extend(flush_reads_within_limit(up, &ctx, run).await?);
    }
    Ok(out)
}

/// BatchUpdateBlobs for merged writes, in calls within the upstream's limit.
async fn flush_writes(
    up: &Upstream,
    ctx: RequestContext,
    blobs: Vec<(Digest, Bytes)>,
) -> Result<Vec<Result<()>>> {
    let mut out = Vec::with_capacity(blobs.len());
    for run in split_by_weight(blobs, up.batch_limit(), |(d, _)| d.size) {
        out.extend(flush_writes_within_limit(up, &ctx, run).await?);
    }
    Ok(out)
}

async fn flush_reads_within_limit(
    up: &Upstream,
    ctx: &RequestContext,
    digests: Vec<Digest>,
) -> Result<Vec<Result<Bytes>>> {
    let stats = up.stats();
    Stats::add(&stats.read_batches, 1);
    Stats::add(&stats.read_batched_blobs, digests.len() as u64);
    let unique: Vec<Digest> = {
        let mut seen = HashSet::new();
        digests
            .iter()
            .filter(|d| seen.insert(**d))
            .copied()
            .collect()
    };
    let message = BatchReadBlobsRequest {
        instance_name: up.instance(ctx),
        digests: unique.iter().map(Digest::to_proto).collect(),
        acceptable_compressors: vec![],
        digest_function: digests[0].function.to_proto(),
    };
    let response = up
        .unary(UpstreamMethod::BatchReadBlobs, || {
            let mut cas = up.cas();
            let request = up.unary_request(ctx, message.clone());
            async move { cas.batch_read_blobs(request).await }
        })
        .await?;
    let mut found: HashMap<(String, i64), Result<Bytes>> = HashMap::new();
    for r in response.responses {
        let Some(d) = r.digest else { continue };
        let code = r.status.as_ref().map_or(0, |s| s.code);
        let result = if code == Code::Ok as i32 {
            Stats::add(&stats.upstream_bytes_received, r.data.len() as u64);
            Ok(Bytes::from(r.data))
        } else {
            let status = r.status.unwrap_or_default();
            Err(up.error(&Status::new(Code::from_i32(status.code), status.message)))
        };
        found.insert((d.hash, d.size_bytes), result);
    }
    Ok(digests
        .iter()
        .map(|d| {
            let data = found
                .get(&(d.hash_hex(), d.size as i64))
                .map(crate::error::duplicate)
                .unwrap_or_else(|| {
                    Err(Error::NotFound(format!("upstream did not return blob {d}")))
                })?;
            verify(d, &Digest::of(d.function, &data))
                .map_err(|e| Error::Unavailable(format!("upstream sent corrupt data: {e}")))?;
            Ok(data)
        })
        .collect())
}

async fn flush_writes_within_limit(
    up: &Upstream,
    ctx: &RequestContext,
    blobs: Vec<(Digest, Bytes)>,
) -> Result<Vec<Result<()>>> {
    let stats = up.stats();
    Stats::add(&stats.write_batches, 1);
    Stats::add(&stats.write_batched_blobs, blobs.len() as u64);
    let bytes: u64 = blobs.iter().map(|(d, _)| d.size).sum();
    let message = BatchUpdateBlobsRequest {
        instance_name: up.instance(ctx),
        requests: blobs
            .iter()
            .map(|(d, data)| batch_update_blobs_request::Request {
                digest: Some(d.to_proto()),
                data: data.to_vec(),
                compressor: 0,
            })
            .collect(),
        digest_function: blobs[0].0.function.to_proto(),
    };
    let response = up
        .unary(UpstreamMethod::BatchUpdateBlobs, || {
            let mut cas = up.cas();
            let request = up.unary_request(ctx, message.clone());
            async move { cas.batch_update_blobs(request).await }
        })
        .await?;
    Stats::add(&stats.upstream_bytes_sent, bytes);
    let mut statuses: HashMap<(String, i64), Result<()>> = HashMap::new();
    for r in response.responses {
        let Some(d) = r.digest else { continue };
        let status = r.status.unwrap_or_default();
        let result = if status.code == Code::Ok as i32 {
            Ok(())
        } else {
            Err(up.error(&Status::new(Code::from_i32(status.code), status.message)))
        };
        statuses.insert((d.hash, d.size_bytes), result);
    }
    Ok(blobs
        .iter()
        .map(|(d, _)| {
            statuses
                .get(&(d.hash_hex(), d.size as i64))
                .map(crate::error::duplicate)
                .unwrap_or_else(|| {
                    Err(Error::Unavailable(format!(
                        "upstream did not confirm blob {d}"
                    )))
                })
        })
        .collect())
}

#[async_trait]
impl BlobStore for UpstreamStore {
    async fn find_missing(&self, ctx: &RequestContext, digests: &[Digest]) -> Result<Vec<Digest>> {
        let wanted: Vec<Digest> = digests
            .iter()
            .filter(|d| !d.is_empty_blob())
            .copied()
            .collect();
        let missing = self.find_missing.submit(ctx, wanted.clone()).await?;
        Ok(wanted
            .into_iter()
            .zip(missing)
            .filter(|(_, m)| *m)
            .map(|(d, _)| d)
            .collect())
    }

    async fn read(
        &self,
        ctx: &RequestContext,
        digest: &Digest,
        offset: u64,
        limit: u64,
    ) -> Result<ChunkStream> {
        let end = digest.read_end(offset, limit);
        let permit = self.upstream.permit().await?;
        let reader = ResumingRead {
            upstream: self.upstream.clone(),
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
                    // A stream silent for a whole rpc_timeout counts as broken.
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

    async fn begin_write(
        &self,
        ctx: &RequestContext,
        digest: &Digest,
    ) -> Result<Box<dyn BlobWriter>> {
        Ok(Box::new(
            UpstreamWriter::start(&self.upstream, ctx, digest).await?,
        ))
    }

    async fn read_many(&self, ctx: &RequestContext, digests: &[Digest]) -> Vec<Result<Bytes>> {
        // Blobs too big for one BatchReadBlobs come over ByteStream.
        let limit = self.upstream.batch_limit();
        let small: Vec<Digest> = digests
            .iter()
            .filter(|d| d.size <= limit)
            .copied()
            .collect();
        let mut batched = match self.reads.submit(ctx, small.clone()).await {
            Ok(results) => results.into_iter(),
            Err(e) => Vec::from_iter(small.iter().map(|_| Err(e.duplicate()))).into_iter(),
        };
        let mut out = Vec::with_capacity(digests.len());
        for d in digests {
            if d.size <= limit {
                out.push(batched.next().expect("one result per small digest"));
            } else {
                out.push(crate::store::read_to_bytes(self, ctx, d).await);
            }
        }
        out
    }

    async fn write_many(
        &self,
        ctx: &RequestContext,
        blobs: Vec<(Digest, Bytes)>,
    ) -> Vec<Result<()>> {
        // Blobs too big for one BatchUpdateBlobs go over ByteStream.
        let limit = self.upstream.batch_limit();
        let (small, large): (Vec<_>, Vec<_>) = blobs
            .into_iter()
            .enumerate()
            .partition(|(_, (d, _))| d.size <= limit);
        let mut out: Vec<Result<()>> = Vec::new();
        out.resize_with(small.len() + large.len(), || Ok(()));
        let (positions, small): (Vec<usize>, Vec<(Digest, Bytes)>) = small.into_iter().unzip();
        let results = match self.writes.submit(ctx, small).await {
            Ok(results) => results,
            Err(e) => positions.iter().map(|_| Err(e.duplicate())).collect(),
        };
        for (i, r) in positions.into_iter().zip(results) {
            out[i] = r;
        }
        for (i, (d, data)) in large {
            out[i] = crate::store::write_bytes(self, ctx, &d, data).await;
        }
        out
    }
}

/// Most times a broken upstream read is resumed at the byte it stopped at.
const MAX_READ_RESUMES: u32 = 3;

/// A ByteStream read from the upstream that picks up where it stopped when
/// the stream breaks.
struct ResumingRead {
    upstream: Arc<Upstream>,
    ctx: RequestContext,
    digest: Digest,
    /// The next byte to receive.
    position: u64,
    /// One past the last byte wanted.
    end: u64,
    resumes: u32,
}

impl ResumingRead {
    /// Starts a Read for `[position, end)` (with the usual retries).
    async fn open(
        &self,
    ) -> Result<tonic::Streaming<bazel_remote_apis::google::bytestream::ReadResponse>> {
        let up = &self.upstream;
        let message = ReadRequest {
            resource_name: read_resource(&up.instance(&self.ctx), &self.digest),
            read_offset: self.position as i64,
            read_limit: (self.end - self.position) as i64,
        };
        // The deadline covers the call's start only: the stream itself may
        // legitimately take longer than rpc_timeout.
        let timeout = up.config().rpc_timeout;
        up.call(UpstreamMethod::ByteStreamRead, || {
            let mut bytestream = up.bytestream();
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
    async fn resume(
        &mut self,
        status: &Status,
    ) -> Result<tonic::Streaming<bazel_remote_apis::google::bytestream::ReadResponse>> {
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

/// A ByteStream upload to the upstream, fed chunk by chunk.
struct UpstreamWriter {
    upstream: Arc<Upstream>,
    digest: Digest,
    resource: String,
    /// Feeds the call; `None` once the call has ended.
    tx: Option<mpsc::Sender<WriteRequest>>,
    call: JoinHandle<std::result::Result<WriteResponse, Status>>,
    sent: u64,
}

impl UpstreamWriter {
    async fn start(up: &Arc<Upstream>, ctx: &RequestContext, digest: &Digest) -> Result<Self> {
        up.check_health()?;
        let permit = up.permit().await?;
        up.stats().upstream_call(UpstreamMethod::ByteStreamWrite);
        let (tx, rx) = mpsc::channel(4);
        let request = up.request(ctx, ReceiverStream::new(rx));
        let mut bytestream = up.bytestream();
        let call = tokio::spawn(async move {
            let _permit = permit;
            bytestream.write(request).await.map(|r| r.into_inner())
        });
        Ok(UpstreamWriter {
            upstream: up.clone(),
            digest: *digest,
            resource: write_resource(&up.instance(ctx), digest),
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

#[async_trait]
impl ActionResultStore for UpstreamStore {
    async fn get_action_result(
        &self,
        ctx: &RequestContext,
        key: &ActionKey,
    ) -> Result<Option<ActionResult>> {
        let up = &self.upstream;
        let message = GetActionResultRequest {
            instance_name: up.instance(ctx),
            action_digest: Some(key.action.to_proto()),
            inline_stdout: false,
            inline_stderr: false,
            inline_output_files: vec![],
            digest_function: key.action.function.to_proto(),
        };
        let result = up
            .unary(UpstreamMethod::GetActionResult, || {
                let mut ac = up.action_cache();
                let request = up.unary_request(ctx, message.clone());
                async move { ac.get_action_result(request).await }
            })
            .await;
        match result {
            Ok(result) => Ok(Some(result)),
            Err(Error::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn put_action_result(
        &self,
        ctx: &RequestContext,
        key: &ActionKey,
        result: &ActionResult,
    ) -> Result<()> {
        let up = &self.upstream;
        let message = UpdateActionResultRequest {
            instance_name: up.instance(ctx),
            action_digest: Some(key.action.to_proto()),
            action_result: Some(result.clone()),
            results_cache_policy: None,
            digest_function: key.action.function.to_proto(),
        };
        up.unary(UpstreamMethod::UpdateActionResult, || {
            let mut ac = up.action_cache();
            let request = up.unary_request(ctx, message.clone());
            async move { ac.update_action_result(request).await }
        })
        .await?;
        Ok(())
    }

    /// The upstream's action cache is not ours to prune: a no-op.
    async fn remove_action_result(&self, _ctx: &RequestContext, _key: &ActionKey) -> Result<()> {
        Ok(())
    }
}
