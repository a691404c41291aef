//! ByteStream: Read (offset, limit, chunked), Write (verified, resumable,
//! early completion when the blob exists) and QueryWriteStatus of CAS
//! names; any other name (Remote Logstream) goes to the passthrough when
//! there is an upstream.

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

use crate::context::RequestContext;
use crate::digest::Digest;
use crate::error::{Error, Result, broke_in_transit, clip};
use crate::reapi::resource::{ResourceName, is_cas_name};
use crate::service::Backend;
use crate::service::parked::{ParkedLimits, ParkedUploads};
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
        let stream = self
            .backend
            .blobs
            .read(
                &ctx,
                &name.digest,
                req.read_offset as u64,
                req.read_limit as u64,
            )
            .await?;
        Ok(Box::pin(stream.flat_map(|chunk| {
            futures::stream::iter(match chunk {
                Ok(bytes) => split(bytes).map(|data| Ok(ReadResponse { data })).collect(),
                Err(e) => vec![Err(Status::from(e))],
            })
        })))
    }

    async fn write_blob(
        &self,
        metadata: &MetadataMap,
        first: WriteRequest,
        mut stream: Streaming<WriteRequest>,
    ) -> Result<WriteResponse> {
        let resource = first.resource_name.clone();
        let name = ResourceName::parse_write(&resource)?;
        let digest = name.digest;
        let ctx = RequestContext::from_metadata(name.instance.clone(), metadata);
        if self.exists(&ctx, &digest).await? {
            // Early completion: the blob is already here.
            self.parked.take(&resource);
            return Ok(WriteResponse {
                committed_size: digest.size as i64,
            });
        }
        let mut writer = match (first.write_offset, self.parked.take(&resource)) {
            (0, _) => self.backend.blobs.begin_write(&ctx, &digest).await?,
            (offset, Some(writer)) if offset as u64 == writer.committed_size() => writer,
            (offset, parked) => {
                let committed = parked.as_ref().map_or(0, |w| w.committed_size());
                if let Some(writer) = parked {
                    self.parked.park(resource.clone(), writer);
                }
                return Err(Error::InvalidArgument(format!(
                    "write_offset {offset} does not match the committed size {committed} of {}",
                    clip(&resource)
                )));
            }
        };
        let mut next = Some(first);
        // Set once finish_write came: the blob is committed only when the
        // client's stream then ends; any further message fails the Write.
        let mut finished = false;
        loop {
            let req = match next.take() {
                Some(req) => req,
                None => match stream.message().await {
                    Ok(Some(req)) => req,
                    Ok(None) if finished => {
                        writer.commit().await?;
                        return Ok(WriteResponse {
                            committed_size: digest.size as i64,
                        });
                    }
                    Ok(None) => {
                        // The client closed without finish_write: keep what
                        // we have so it can resume, and say how much that is.
                        let committed = writer.committed_size();
                        self.parked.park(resource, writer);
                        return Ok(WriteResponse {
                            committed_size: committed as i64,
                        });
                    }
                    Err(status) if !broke_in_transit(&status) => {
                        // A message that does not decode fails the Write
                        // (INVALID_ARGUMENT); nothing is kept.
                        return Err(Error::from_client_stream(&status));
                    }
                    Err(status) => {
                        self.parked.park(resource, writer);
                        return Err(Error::Unavailable(format!("Write stream broke: {status}")));
                    }
                },
            };
            if finished {
                return Err(Error::InvalidArgument(
                    "a WriteRequest followed the one with finish_write set; nothing was stored"
                        .into(),
                ));
            }
            if !req.resource_name.is_empty() && req.resource_name != resource {
                return Err(Error::InvalidArgument(format!(
                    "resource_name changed mid-stream from {:?} to {:?}",
                    clip(&resource),
                    clip(&req.resource_name)
                )));
            }
            if req.write_offset as u64 != writer.committed_size() {
                return Err(Error::InvalidArgument(format!(
                    "write_offset {} does not match the {} bytes received so far",
                    req.write_offset,
                    writer.committed_size()
                )));
            }
            if !req.data.is_empty() {
                writer.write(Bytes::from(req.data)).await?;
            }
            finished = req.finish_write;
        }
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
