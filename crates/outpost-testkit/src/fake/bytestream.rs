//! ByteStream of the fake: Read in chunks (with an optional delay per chunk
//! and injected aborts), resumable Write (partial uploads are kept), and
//! QueryWriteStatus. `compressed-blobs/zstd/…` both ways when compression
//! is on (`compression`). Log stream names go to `logstream`.

use std::sync::atomic::Ordering;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};

use super::call::{CallGuard, Entry, Logged};
use super::cas::BoxStream;
use super::compression::decompress_in;
use super::state::{Shared, check_digest, lock, verify};
use super::{Method, Svc};
use crate::{bs, re};
use re::digest_function::Value as DigestFunction;

/// The log entry of a ByteStream call: what its resource name names.
fn resource_entry(name: &str, write: bool) -> Entry {
    match parse_resource(name, write) {
        Ok(r) => Entry::new(&r.instance, vec![r.digest]),
        Err(_) => Entry::default(),
    }
}

impl Logged for bs::ReadRequest {
    fn entry(&self, _: &Shared) -> Entry {
        resource_entry(&self.resource_name, false)
    }
}

impl Logged for bs::WriteRequest {
    fn entry(&self, _: &Shared) -> Entry {
        resource_entry(&self.resource_name, true)
    }
}

impl Logged for bs::QueryWriteStatusRequest {
    fn entry(&self, _: &Shared) -> Entry {
        resource_entry(&self.resource_name, true)
    }
}

/// A parsed ByteStream resource name.
struct Resource {
    instance: String,
    digest: re::Digest,
    function: i32,
    compressed: bool,
}

/// `[opt digest function] hash size [rest…]` after `blobs` / `compressed-blobs/C`.
fn parse_blob_tail(segs: &[&str], allow_rest: bool) -> Option<(re::Digest, i32, usize)> {
    let (function, segs) = match segs.first() {
        Some(s) if segs.len() >= 3 => match DigestFunction::from_str_name(&s.to_uppercase()) {
            Some(f) => (f as i32, &segs[1..]),
            None => (0, segs),
        },
        _ => (0, segs),
    };
    if segs.len() < 2 || (!allow_rest && segs.len() != 2) {
        return None;
    }
    let size = segs[1].parse::<i64>().ok()?;
    Some((
        re::Digest {
            hash: segs[0].to_string(),
            size_bytes: size,
        },
        function,
        segs.len() - 2,
    ))
}

fn parse_resource(name: &str, write: bool) -> Result<Resource, Status> {
    let bad = || {
        Status::invalid_argument(format!(
            "fake upstream: bad ByteStream resource name {name:?}"
        ))
    };
    let segs: Vec<&str> = name.split('/').collect();
    let (instance_end, blobs_at) = if write {
        let u = segs.iter().position(|s| *s == "uploads").ok_or_else(bad)?;
        (u, u + 2)
    } else {
        let b = segs
            .iter()
            .position(|s| *s == "blobs" || *s == "compressed-blobs")
            .ok_or_else(bad)?;
        (b, b)
    };
    let instance = segs[..instance_end].join("/");
    let compressed = match segs.get(blobs_at) {
        Some(&"blobs") => false,
        Some(&"compressed-blobs") => true,
        _ => return Err(bad()),
    };
    if compressed && segs.get(blobs_at + 1) != Some(&"zstd") {
        return Err(Status::unimplemented(format!(
            "fake upstream: compressor of {name:?} is not supported (only zstd)"
        )));
    }
    let tail_at = blobs_at + 1 + usize::from(compressed);
    let tail = segs.get(tail_at..).ok_or_else(bad)?;
    let (digest, function, _) = parse_blob_tail(tail, write).ok_or_else(bad)?;
    Ok(Resource {
        instance,
        digest,
        function,
        compressed,
    })
}

impl Shared {
    /// A resource name the fake can serve: parsed, uncompressed, with an
    /// advertised digest function and a well-formed digest.
    fn checked_resource(&self, name: &str, write: bool) -> Result<Resource, Status> {
        let res = parse_resource(name, write)?;
        if res.compressed && !self.zstd_on() {
            return Err(Status::unimplemented(
                "fake upstream: compressed-blobs are not supported",
            ));
        }
        self.check_function(res.function)?;
        check_digest(&res.digest, res.function)?;
        Ok(res)
    }
}

impl Svc {
    /// Write after the prologue: appends to the partial upload of `name`.
    async fn write_inner(
        &self,
        guard: &CallGuard,
        name: &str,
        first: bs::WriteRequest,
        stream: &mut Streaming<bs::WriteRequest>,
    ) -> Result<bs::WriteResponse, Status> {
        let res = self.s.checked_resource(name, true)?;
        if res.compressed {
            return self.write_compressed(guard, &res, first, stream).await;
        }
        let size = res.digest.size_bytes;
        if self.s.has(&res.digest) {
            lock(&self.s.data).uploads.remove(name);
            return Ok(bs::WriteResponse {
                committed_size: size,
            });
        }
        let mut buf = {
            let mut data = lock(&self.s.data);
            let partial = data.uploads.remove(name).unwrap_or_default();
            match first.write_offset {
                0 => Vec::new(),
                o if o == partial.len() as i64 => partial,
                o => {
                    if !partial.is_empty() {
                        data.uploads.insert(name.to_string(), partial.clone());
                    }
                    return Err(Status::invalid_argument(format!(
                        "fake upstream: write_offset {o} but {} bytes committed",
                        partial.len()
                    )));
                }
            }
        };
        let abort = self.s.take_abort(Method::Write);
        let park = |buf: Vec<u8>| {
            lock(&self.s.data).uploads.insert(name.to_string(), buf);
        };
        let mut msg = first;
        loop {
            if msg.write_offset != buf.len() as i64 {
                let got = msg.write_offset;
                let have = buf.len();
                park(buf);
                return Err(Status::invalid_argument(format!(
                    "fake upstream: write_offset {got}, expected {have}"
                )));
            }
            if !msg.resource_name.is_empty() && msg.resource_name != name {
                park(buf);
                return Err(Status::invalid_argument(
                    "fake upstream: resource_name changed mid-stream",
                ));
            }
            let mut data = msg.data;
            if let Some((after, code)) = abort
                && (buf.len() + data.len()) as u64 >= after
                && !(msg.finish_write && (buf.len() + data.len()) as u64 == after)
            {
                data.truncate(after.saturating_sub(buf.len() as u64) as usize);
                guard.update(|c| {
                    c.bytes_received += data.len() as u64;
                    c.injected = true;
                });
                buf.extend_from_slice(&data);
                park(buf);
                return Err(Status::new(
                    code,
                    format!("fake upstream: injected abort of Write after {after} bytes"),
                ));
            }
            guard.add_received(data.len() as u64);
            buf.extend_from_slice(&data);
            if buf.len() as i64 > size {
                return Err(Status::invalid_argument(format!(
                    "fake upstream: more than {size} bytes written"
                )));
            }
            if msg.finish_write {
                verify(&res.digest, res.function, &buf)?;
                self.s.store(&res.digest, Bytes::from(buf));
                return Ok(bs::WriteResponse {
                    committed_size: size,
                });
            }
            match stream.message().await {
                Ok(Some(next)) => msg = next,
                Ok(None) => {
                    let n = buf.len();
                    park(buf);
                    return Err(Status::invalid_argument(format!(
                        "fake upstream: stream ended before finish_write ({n} bytes kept)"
                    )));
                }
                Err(e) => {
                    park(buf);
                    return Err(e);
                }
            }
        }
    }
}

impl Svc {
    /// A Write of `compressed-blobs/zstd/…`: the compressed bytes are
    /// gathered (bounded), decoded at `finish_write` (bounded by the
    /// digest's size), verified and stored plain. The first `write_offset`
    /// must be 0 (the fake keeps no partial compressed uploads); each later
    /// one the compressed bytes sent before it. Early completion answers -1,
    /// a completed upload the blob's (uncompressed) size.
    async fn write_compressed(
        &self,
        guard: &CallGuard,
        res: &Resource,
        first: bs::WriteRequest,
        stream: &mut Streaming<bs::WriteRequest>,
    ) -> Result<bs::WriteResponse, Status> {
        let size = res.digest.size_bytes;
        if self.s.has(&res.digest) {
            return Ok(bs::WriteResponse { committed_size: -1 });
        }
        if first.write_offset != 0 {
            return Err(Status::invalid_argument(format!(
                "fake upstream: compressed write_offset {} but nothing committed",
                first.write_offset
            )));
        }
        // zstd never grows data by more than a small fraction.
        let most = size as u64 + size as u64 / 8 + 1024;
        let abort = self.s.take_abort(Method::Write);
        let mut buf: Vec<u8> = Vec::new();
        let mut msg = first;
        loop {
            if msg.write_offset != buf.len() as i64 {
                return Err(Status::invalid_argument(format!(
                    "fake upstream: compressed write_offset {}, expected {}",
                    msg.write_offset,
                    buf.len()
                )));
            }
            if let Some((after, code)) = abort
                && (buf.len() + msg.data.len()) as u64 >= after
            {
                guard.update(|c| c.injected = true);
                return Err(Status::new(
                    code,
                    format!("fake upstream: injected abort of Write after {after} bytes"),
                ));
            }
            guard.add_received(msg.data.len() as u64);
            buf.extend_from_slice(&msg.data);
            if buf.len() as u64 > most {
                return Err(Status::invalid_argument(format!(
                    "fake upstream: more than {most} compressed bytes for {size} plain"
                )));
            }
            if msg.finish_write {
                let plain = decompress_in(&buf, size)?;
                verify(&res.digest, res.function, &plain)?;
                self.s.store(&res.digest, Bytes::from(plain));
                guard.update(|c| c.compressed_blobs += 1);
                return Ok(bs::WriteResponse {
                    committed_size: size,
                });
            }
            match stream.message().await {
                Ok(Some(next)) => msg = next,
                Ok(None) => {
                    return Err(Status::invalid_argument(
                        "fake upstream: compressed stream ended before finish_write",
                    ));
                }
                Err(e) => return Err(e),
            }
        }
    }
}

#[tonic::async_trait]
impl bs::byte_stream_server::ByteStream for Svc {
    type ReadStream = BoxStream<bs::ReadResponse>;

    async fn read(
        &self,
        request: Request<bs::ReadRequest>,
    ) -> Result<Response<Self::ReadStream>, Status> {
        let (guard, req) = self.s.enter(Method::Read, request).await?;
        if self.s.is_log_name(&req.resource_name) {
            return self.read_log(guard, req);
        }
        let checked = (|| {
            let res = self.s.checked_resource(&req.resource_name, false)?;
            let size = res.digest.size_bytes;
            if req.read_offset < 0 || req.read_offset > size {
                return Err(Status::out_of_range(format!(
                    "fake upstream: read_offset {} outside 0..={size}",
                    req.read_offset
                )));
            }
            if req.read_limit < 0 || (res.compressed && req.read_limit != 0) {
                return Err(Status::invalid_argument(
                    "fake upstream: negative read_limit, or one on compressed-blobs",
                ));
            }
            let data = self
                .s
                .blob(&res.digest)
                .ok_or_else(|| Status::not_found("fake upstream: blob not found"))?;
            let start = req.read_offset as usize;
            if res.compressed {
                // One frame of the blob from the (uncompressed) offset on.
                guard.update(|c| c.compressed_blobs += 1);
                return Ok(Bytes::from(self.s.compress_out(&data[start..])));
            }
            let end = if req.read_limit == 0 {
                data.len()
            } else {
                (start + req.read_limit as usize).min(data.len())
            };
            Ok(data.slice(start..end))
        })();
        let data = match checked {
            Ok(data) => data,
            Err(e) => {
                guard.finish(e.code(), false);
                return Err(e);
            }
        };
        let abort = self.s.take_abort(Method::Read);
        let chunk = self.s.read_chunk.load(Ordering::Relaxed).max(1);
        let delay = lock(&self.s.latency).read_chunk_delay;
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut pos = 0usize;
            loop {
                if let Some((after, code)) = abort
                    && pos as u64 >= after
                    && pos < data.len()
                {
                    guard.finish(code, true);
                    let _ = tx
                        .send(Err(Status::new(
                            code,
                            format!("fake upstream: injected abort of Read after {after} bytes"),
                        )))
                        .await;
                    return;
                }
                if pos >= data.len() {
                    break;
                }
                let mut n = chunk.min(data.len() - pos);
                if let Some((after, _)) = abort {
                    n = n.min((after as usize).saturating_sub(pos).max(1));
                }
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                let msg = bs::ReadResponse {
                    data: data.slice(pos..pos + n).to_vec(),
                };
                if tx.send(Ok(msg)).await.is_err() {
                    return; // the client went away: the guard records Cancelled
                }
                guard.add_sent(n as u64);
                pos += n;
            }
            guard.finish(Code::Ok, false);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn write(
        &self,
        request: Request<Streaming<bs::WriteRequest>>,
    ) -> Result<Response<bs::WriteResponse>, Status> {
        let headers = request.metadata().clone();
        let mut stream = request.into_inner();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("fake upstream: empty Write stream"))?;
        let name = first.resource_name.clone();
        let entry = first.entry(&self.s);
        let guard = self.s.begin(Method::Write, entry, &headers).await?;
        let result = if self.s.is_log_name(&name) {
            self.write_log(&guard, first, &mut stream).await
        } else {
            self.write_inner(&guard, &name, first, &mut stream).await
        };
        guard.complete(&result);
        result.map(Response::new)
    }

    async fn query_write_status(
        &self,
        request: Request<bs::QueryWriteStatusRequest>,
    ) -> Result<Response<bs::QueryWriteStatusResponse>, Status> {
        self.unary(Method::QueryWriteStatus, request, |_, req| {
            if self.s.is_log_name(&req.resource_name) {
                return self.query_log(&req.resource_name);
            }
            let res = parse_resource(&req.resource_name, true)?;
            if self.s.has(&res.digest) {
                return Ok(bs::QueryWriteStatusResponse {
                    committed_size: res.digest.size_bytes,
                    complete: true,
                });
            }
            match lock(&self.s.data).uploads.get(&req.resource_name) {
                Some(partial) => Ok(bs::QueryWriteStatusResponse {
                    committed_size: partial.len() as i64,
                    complete: false,
                }),
                None => Err(Status::not_found("fake upstream: unknown upload")),
            }
        })
        .await
    }
}
