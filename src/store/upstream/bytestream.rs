//! Blobs too large for a batch travel over ByteStream: a read that resumes
//! where it broke, and an upload fed chunk by chunk; either plain or
//! zstd-compressed on the wire ([`Wire`]).

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bazel_remote_apis::google::bytestream::{
    ReadRequest, ReadResponse, WriteRequest, WriteResponse,
};
use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use crate::compression::{Compressor, Decompressor, StreamCompressor};
use crate::context::{Priority, RequestContext};
use crate::digest::Digest;
use crate::error::{Error, Result, clip};
use crate::reapi::resource::ResourceName;
use crate::stats::{Stats, UpstreamMethod};
use crate::store::{BlobWriter, ChunkStream};
use crate::upstream::Upstream;
use crate::upstream::client::{CallSlot, is_transient};

/// Most times a broken upstream read is resumed at the byte it stopped at.
const MAX_READ_RESUMES: u32 = 3;

/// How a blob crosses the wire, and in which form the caller sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wire {
    /// Plain on the wire and for the caller.
    Plain,
    /// Compressed on the wire, plain for the caller: decoded here (read) or
    /// encoded here (write), bounded by the digest's size.
    Coded(Compressor),
    /// Compressed on the wire and for the caller, passed as it is.
    Compressed(Compressor),
}

impl Wire {
    /// The compressor on the wire, if any.
    fn compressor(self) -> Option<Compressor> {
        match self {
            Wire::Plain => None,
            Wire::Coded(c) | Wire::Compressed(c) => Some(c),
        }
    }
}

/// Streams `[offset, offset + limit)` of a blob from the upstream, in a call
/// slot held until the stream ends (for a client, the slot counts the
/// stream as client work until then). A stream that breaks is resumed (see
/// [`ResumingRead`]); one silent for a whole `rpc_timeout` counts as broken.
///
/// Compressed on the wire (`wire` not plain), `limit` must reach the end of
/// the blob (REAPI has no compressed ranged reads). [`Wire::Coded`]
/// decodes (bounded by the size wanted: a bomb or corrupt data ends the
/// stream UNAVAILABLE) and resumes at the plain byte it reached;
/// [`Wire::Compressed`] hands the bytes on as they came and resumes only
/// before the first of them.
pub async fn read(
    upstream: &Arc<Upstream>,
    ctx: &RequestContext,
    digest: &Digest,
    offset: u64,
    limit: u64,
    wire: Wire,
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
        compressor: wire.compressor(),
    };
    let opened = Instant::now();
    let first = reader.open().await?;
    let decoder = match wire {
        Wire::Coded(_) => Some(Decompressor::new(end - offset)?),
        _ => None,
    };
    let state = ReadState {
        reader,
        stream: first,
        _permit: permit,
        decoder,
        pending: Bytes::new(),
        raw: matches!(wire, Wire::Compressed(_)),
        handed_on: false,
        opened,
        received: 0,
    };
    Ok(Box::pin(futures::stream::unfold(
        Some(state),
        |state| async move {
            let mut state = state?;
            match state.next().await {
                Some(Ok(chunk)) => Some((Ok(chunk), Some(state))),
                Some(Err(e)) => Some((Err(e), None)),
                None => None,
            }
        },
    )))
}

/// A read in progress: the stream, its call slot and, compressed, its decoder.
struct ReadState {
    reader: ResumingRead,
    stream: Streaming<ReadResponse>,
    _permit: CallSlot,
    /// [`Wire::Coded`]: decodes what arrives (reset on a resume).
    decoder: Option<Decompressor>,
    /// Compressed bytes received and not decoded yet: decoded a chunk per
    /// call, so a message that expands a thousandfold is never held whole.
    pending: Bytes,
    /// [`Wire::Compressed`]: the bytes are handed on as they came.
    raw: bool,
    /// Whether any byte was handed on (a raw read cannot resume after that).
    handed_on: bool,
    /// When the read was called, and the bytes received since: a client's
    /// large read measures the link's throughput (`upstream::link`).
    opened: Instant,
    received: u64,
}

impl ReadState {
    /// The next chunk for the caller; `None` at the end.
    async fn next(&mut self) -> Option<Result<Bytes>> {
        let up = self.reader.upstream.clone();
        let idle = up.config().rpc_timeout;
        loop {
            if let Some(decoder) = &mut self.decoder {
                match decoder.next_chunk(&mut self.pending) {
                    Ok(Some(plain)) => {
                        let m = plain.len() as u64;
                        self.reader.position += m;
                        Stats::add(&up.stats().upstream_compressed_plain_bytes, m);
                        self.handed_on = true;
                        return Some(Ok(plain));
                    }
                    Ok(None) => {}
                    Err(e) => return Some(Err(corrupt(&self.reader.digest, &e))),
                }
            }
            let next = tokio::time::timeout(idle, self.stream.message())
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
                    Stats::add(&up.stats().upstream_bytes_received, n);
                    self.received += n;
                    let data = Bytes::from(message.data);
                    if self.reader.compressor.is_some() {
                        Stats::add(&up.stats().upstream_compressed_wire_bytes, n);
                    }
                    let chunk = match &self.decoder {
                        None if self.raw => data,
                        None => {
                            self.reader.position += n;
                            data
                        }
                        Some(_) => {
                            self.pending = data;
                            continue;
                        }
                    };
                    if chunk.is_empty() {
                        continue;
                    }
                    self.handed_on = true;
                    return Some(Ok(chunk));
                }
                Ok(None) => {
                    if self.reader.ctx.priority == Priority::Client {
                        up.link().download(self.received, self.opened.elapsed());
                    }
                    return self.end();
                }
                Err(status) => {
                    up.record_error(&status);
                    if self.raw && self.handed_on {
                        return Some(Err(up.error(&status)));
                    }
                    match self.reader.resume(&status).await {
                        Ok(next) => self.stream = next,
                        Err(e) => return Some(Err(e)),
                    }
                    if self.decoder.is_some() {
                        self.pending = Bytes::new();
                        match Decompressor::new(self.reader.end - self.reader.position) {
                            Ok(d) => self.decoder = Some(d),
                            Err(e) => return Some(Err(e)),
                        }
                    }
                }
            }
        }
    }

    /// The stream ended: a decoded read must have reached its end at the
    /// end of a frame (else the upstream sent a short or corrupt stream).
    fn end(&mut self) -> Option<Result<Bytes>> {
        let decoder = self.decoder.as_ref()?;
        let short = self.reader.position != self.reader.end;
        match decoder.finish() {
            Err(e) => Some(Err(corrupt(&self.reader.digest, &e))),
            Ok(()) if short => Some(Err(Error::Unavailable(format!(
                "upstream sent {} of {} bytes of {} compressed",
                self.reader.position, self.reader.end, self.reader.digest
            )))),
            Ok(()) => None,
        }
    }
}

/// Compressed data from the upstream that does not decode: the upstream
/// is at fault, not the client (UNAVAILABLE, as for a hash mismatch).
fn corrupt(digest: &Digest, e: &Error) -> Error {
    Error::Unavailable(format!(
        "upstream sent corrupt compressed data for {digest}: {}",
        clip(&e.to_string())
    ))
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
    /// The compressor on the wire, if any (a `compressed-blobs` name).
    compressor: Option<Compressor>,
}

impl ResumingRead {
    /// Starts a Read for `[position, end)` (with the usual retries).
    async fn open(&self) -> Result<Streaming<ReadResponse>> {
        let up = &self.upstream;
        let mut name = ResourceName::read(&up.instance(&self.ctx), self.digest);
        if let Some(c) = self.compressor {
            name = name.compressed(c.name());
        }
        let message = ReadRequest {
            resource_name: name.to_string(),
            read_offset: self.position as i64,
            // Compressed reads go to the end; REAPI refuses a limit there.
            read_limit: match self.compressor {
                None => (self.end - self.position) as i64,
                Some(_) => 0,
            },
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

/// A ByteStream upload to the upstream, fed chunk by chunk: plain, encoded
/// here ([`Wire::Coded`]: plain pieces in, one zstd frame out) or compressed
/// by the caller ([`Wire::Compressed`]: pieces sent as they are).
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
    /// Bytes handed to the call so far (the next message's write offset:
    /// REAPI counts compressed bytes after a first offset of 0).
    sent: u64,
    /// How the bytes cross.
    wire: Wire,
    /// [`Wire::Coded`]: the encoder of the one frame sent.
    encoder: Option<StreamCompressor>,
    /// Plain bytes accepted (what `committed_size` reports; a caller's
    /// compressed pieces are not decoded, so they count none).
    accepted: u64,
}

impl UpstreamWriter {
    /// Opens the Write call for `digest` (in a call slot held until it ends,
    /// counting as client work for a client's write).
    pub async fn start(
        up: &Arc<Upstream>,
        ctx: &RequestContext,
        digest: &Digest,
        wire: Wire,
    ) -> Result<Self> {
        up.check_health()?;
        let encoder = match wire {
            Wire::Coded(_) => Some(StreamCompressor::new()?),
            _ => None,
        };
        let permit = up.slot(ctx, UpstreamMethod::ByteStreamWrite).await?;
        up.stats().upstream_call(UpstreamMethod::ByteStreamWrite);
        let (tx, rx) = mpsc::channel(4);
        let request = up.request(ctx, ReceiverStream::new(rx));
        let mut bytestream = up.bytestream(ctx);
        let call = tokio::spawn(async move {
            let _permit = permit;
            bytestream.write(request).await.map(|r| r.into_inner())
        });
        let mut name = ResourceName::upload(&up.instance(ctx), &upload_id(), *digest);
        if let Some(c) = wire.compressor() {
            name = name.compressed(c.name());
        }
        Ok(UpstreamWriter {
            upstream: up.clone(),
            digest: *digest,
            resource: name.to_string(),
            tx: Some(tx),
            call,
            sent: 0,
            wire,
            encoder,
            accepted: 0,
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
        let stats = self.upstream.stats();
        Stats::add(&stats.upstream_bytes_sent, len);
        if self.wire != Wire::Plain {
            Stats::add(&stats.upstream_compressed_wire_bytes, len);
        }
        Ok(())
    }

    /// Whether the upstream's `committed_size` confirms the whole blob:
    /// its size; for a compressed upload also -1 (completed early) or the
    /// compressed bytes sent (servers read the spec both ways).
    fn confirms(&self, committed: i64) -> bool {
        committed == self.digest.size as i64
            || (self.wire != Wire::Plain && (committed == -1 || committed == self.sent as i64))
    }
}

#[async_trait]
impl BlobWriter for UpstreamWriter {
    async fn write(&mut self, data: Bytes) -> Result<()> {
        if !matches!(self.wire, Wire::Compressed(_)) {
            self.accepted += data.len() as u64;
        }
        match &mut self.encoder {
            Some(encoder) => {
                let packed = encoder.feed(&data)?;
                if packed.is_empty() {
                    return Ok(());
                }
                self.send(packed.to_vec(), false).await
            }
            None => self.send(data.to_vec(), false).await,
        }
    }

    fn committed_size(&self) -> u64 {
        self.accepted
    }

    async fn commit(mut self: Box<Self>) -> Result<()> {
        let last = match self.encoder.take() {
            Some(encoder) => encoder.finish()?.to_vec(),
            None => Vec::new(),
        };
        self.send(last, true).await?;
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
            Ok(response) if self.confirms(response.committed_size) => {
                if self.wire != Wire::Plain {
                    let stats = self.upstream.stats();
                    Stats::add(&stats.upstream_compressed_plain_bytes, self.digest.size);
                }
                Ok(())
            }
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
