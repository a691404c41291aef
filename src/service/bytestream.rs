//! ByteStream: Read (offset, limit, chunked), Write (verified, resumable,
//! early completion when the blob exists; in [`write`]) and QueryWriteStatus
//! of CAS names, plain (`blobs/…`) or zstd-compressed (`compressed-blobs/zstd/…`);
//! any other name (Remote Logstream) goes to the passthrough when there is
//! an upstream.
//!
//! For compressed names REAPI measures offsets in uncompressed bytes: a
//! Read's `read_offset` (its `read_limit` must be 0), a Write's first
//! `write_offset` and QueryWriteStatus's `committed_size`; only the later
//! messages of one Write count compressed bytes (first offset + compressed
//! bytes sent so far).

mod write;

use std::pin::Pin;
use std::sync::Arc;

use bazel_remote_apis::google::bytestream::{
    QueryWriteStatusRequest, QueryWriteStatusResponse, ReadRequest, ReadResponse, WriteRequest,
    WriteResponse, byte_stream_server::ByteStream,
};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};

use crate::compression::Compressor;
use crate::context::RequestContext;
use crate::digest::Digest;
use crate::error::{Error, Result, clip};
use crate::reapi::resource::{ResourceName, is_cas_name};
use crate::service::Backend;
use crate::service::parked::{ParkedLimits, ParkedUploads};
use crate::stats::Stats;
use crate::upstream::passthrough::Passthrough;

/// Largest `data` in one ReadResponse (well under gRPC's 4 MiB message limit).
pub const READ_CHUNK: usize = 64 << 10;
/// Serves ByteStream over the backend's blob store.
pub struct ByteStreamService {
    backend: Backend,
    /// Interrupted uploads by resource name, for QueryWriteStatus and resume.
    parked: Arc<ParkedUploads>,
    /// Where names that are not CAS names go (proxy mode only).
    passthrough: Option<Arc<Passthrough>>,
}

impl ByteStreamService {
    /// A ByteStream service over `backend` (interrupted uploads parked
    /// with the default bounds of a 4 GiB store).
    pub fn new(backend: Backend) -> Self {
        let parked = ParkedUploads::new(ParkedLimits::for_quota(4 << 30), backend.stats.clone());
        ByteStreamService {
            backend,
            parked: Arc::new(parked),
            passthrough: None,
        }
    }

    /// Parks interrupted uploads in `parked` (the server's, whose reclaimer
    /// the local store calls).
    pub fn with_parked(self, parked: Arc<ParkedUploads>) -> Self {
        ByteStreamService { parked, ..self }
    }

    /// Sends names that are not CAS names to `passthrough` (when set);
    /// without it they are rejected as malformed CAS names.
    pub fn with_passthrough(self, passthrough: Option<Arc<Passthrough>>) -> Self {
        ByteStreamService {
            passthrough,
            ..self
        }
    }

    /// The passthrough, if `name` is not a CAS name and there is one.
    fn passthrough_for(&self, name: &str) -> Option<&Passthrough> {
        self.passthrough.as_deref().filter(|_| !is_cas_name(name))
    }

    async fn exists(&self, ctx: &RequestContext, digest: &Digest) -> Result<bool> {
        self.backend.blobs.holds(ctx, digest).await
    }

    async fn read_stream(&self, metadata: &MetadataMap, req: ReadRequest) -> Result<ReadStream> {
        let name = ResourceName::parse_read(&req.resource_name)?;
        let ctx = RequestContext::from_metadata(name.instance.clone(), metadata);
        if req.read_offset < 0 {
            return Err(Error::OutOfRange(format!(
                "read_offset {} is negative",
                req.read_offset
            )));
        }
        if req.read_limit < 0 {
            return Err(Error::InvalidArgument(format!(
                "read_limit {} is negative",
                req.read_limit
            )));
        }
        let offset = req.read_offset as u64;
        let stream = match compressor_of(&name)? {
            None => {
                let limit = req.read_limit as u64;
                self.backend
                    .blobs
                    .read(&ctx, &name.digest, offset, limit)
                    .await?
            }
            Some(compressor) => {
                if req.read_limit != 0 {
                    return Err(Error::InvalidArgument(format!(
                        "read_limit {} on a compressed-blobs name: it must be 0 (REAPI)",
                        req.read_limit
                    )));
                }
                if offset > name.digest.size {
                    return Err(Error::OutOfRange(format!(
                        "read_offset {offset} is past the end of {}",
                        name.digest
                    )));
                }
                let stream = self
                    .backend
                    .blobs
                    .read_compressed(&ctx, &name.digest, offset, compressor)
                    .await?;
                Stats::add(&self.backend.stats.client_compressed_blobs, 1);
                stream
            }
        };
        Ok(Box::pin(stream.flat_map(|chunk| {
            futures::stream::iter(match chunk {
                Ok(bytes) => split(bytes).map(|data| Ok(ReadResponse { data })).collect(),
                Err(e) => vec![Err(Status::from(e))],
            })
        })))
    }

    async fn query(
        &self,
        metadata: &MetadataMap,
        req: QueryWriteStatusRequest,
    ) -> Result<QueryWriteStatusResponse> {
        let name = ResourceName::parse_write(&req.resource_name)?;
        let ctx = RequestContext::from_metadata(name.instance.clone(), metadata);
        if self.exists(&ctx, &name.digest).await? {
            return Ok(QueryWriteStatusResponse {
                committed_size: name.digest.size as i64,
                complete: true,
            });
        }
        match self.parked.committed_size(&req.resource_name) {
            Some(size) => Ok(QueryWriteStatusResponse {
                committed_size: size as i64,
                complete: false,
            }),
            None => Err(Error::NotFound(format!(
                "no upload in progress for {}",
                clip(&req.resource_name)
            ))),
        }
    }
}

/// The compressor of a `compressed-blobs` name (`None` for `blobs`).
/// Parsing already refused the compressors this server does not serve.
fn compressor_of(name: &ResourceName) -> Result<Option<Compressor>> {
    name.compressor
        .as_deref()
        .map(|c| {
            Compressor::from_name(c).ok_or_else(|| {
                Error::Unimplemented(format!("compressed-blobs ({}) are not served", clip(c)))
            })
        })
        .transpose()
}

/// Splits a chunk from the store into ReadResponse-sized pieces.
fn split(bytes: Bytes) -> impl Iterator<Item = Vec<u8>> {
    let len = bytes.len();
    (0..len)
        .step_by(READ_CHUNK)
        .map(move |start| bytes[start..(start + READ_CHUNK).min(len)].to_vec())
}

type ReadStream = Pin<Box<dyn Stream<Item = std::result::Result<ReadResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ByteStream for ByteStreamService {
    type ReadStream = ReadStream;

    async fn read(
        &self,
        request: Request<ReadRequest>,
    ) -> std::result::Result<Response<ReadStream>, Status> {
        let (metadata, _, req) = request.into_parts();
        if let Some(passthrough) = self.passthrough_for(&req.resource_name) {
            return Ok(Response::new(passthrough.read(&metadata, req).await?));
        }
        Ok(Response::new(self.read_stream(&metadata, req).await?))
    }

    async fn write(
        &self,
        request: Request<Streaming<WriteRequest>>,
    ) -> std::result::Result<Response<WriteResponse>, Status> {
        let (metadata, _, mut stream) = request.into_parts();
        let first = match stream.message().await {
            Ok(Some(first)) => first,
            Ok(None) => return Err(Error::InvalidArgument("empty Write stream".into()).into()),
            Err(status) => return Err(Error::from_client_stream(&status).into()),
        };
        let response = match self.passthrough_for(&first.resource_name) {
            Some(passthrough) => passthrough.write(&metadata, first, stream).await?,
            None => self.write_blob(&metadata, first, stream).await?,
        };
        Ok(Response::new(response))
    }

    async fn query_write_status(
        &self,
        request: Request<QueryWriteStatusRequest>,
    ) -> std::result::Result<Response<QueryWriteStatusResponse>, Status> {
        let (metadata, _, req) = request.into_parts();
        if let Some(passthrough) = self.passthrough_for(&req.resource_name) {
            return Ok(Response::new(
                passthrough.query_write_status(&metadata, req).await?,
            ));
        }
        Ok(Response::new(self.query(&metadata, req).await?))
    }
}
