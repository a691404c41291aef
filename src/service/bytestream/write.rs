//! ByteStream Write of CAS names, plain or compressed: verified at commit,
//! resumable (an interrupted upload is parked under its resource name),
//! ended early when the blob is already here.
//!
//! The two forms differ only in their offsets and answers (REAPI):
//! - the first `write_offset` is in plain bytes for both: 0, or the
//!   `committed_size` of the parked upload it resumes;
//! - every later message's `write_offset` is the first one plus the bytes
//!   of `data` sent before it in this call (compressed bytes for a
//!   compressed upload);
//! - early completion answers the blob's size for a plain upload, `-1` for
//!   a compressed one;
//! - a finished upload answers the blob's size for a plain upload, and for
//!   a compressed one the first offset plus the compressed bytes sent (the
//!   offset after its last message: what Bazel's uploader checks, besides
//!   -1);
//! - a stream that ends without `finish_write` answers (and parks) the
//!   plain bytes received, where the client resumes in either form.

use bazel_remote_apis::google::bytestream::{WriteRequest, WriteResponse};
use bytes::Bytes;
use tonic::Streaming;
use tonic::metadata::MetadataMap;

use super::{ByteStreamService, compressor_of};
use crate::compression::Compressor;
use crate::context::RequestContext;
use crate::digest::Digest;
use crate::error::{Error, Result, broke_in_transit, clip};
use crate::reapi::resource::ResourceName;
use crate::stats::Stats;
use crate::store::BlobWriter;

impl ByteStreamService {
    /// Serves one Write of a CAS name whose first message is `first`.
    pub(super) async fn write_blob(
        &self,
        metadata: &MetadataMap,
        first: WriteRequest,
        mut stream: Streaming<WriteRequest>,
    ) -> Result<WriteResponse> {
        let resource = first.resource_name.clone();
        let name = ResourceName::parse_write(&resource)?;
        let compressor = compressor_of(&name)?;
        let digest = name.digest;
        let ctx = RequestContext::from_metadata(name.instance.clone(), metadata);
        if self.exists(&ctx, &digest).await? {
            // Early completion: the blob is already here.
            self.parked.take(&resource);
            let committed_size = match compressor {
                None => digest.size as i64,
                Some(_) => -1,
            };
            return Ok(WriteResponse { committed_size });
        }
        let start = first.write_offset;
        let mut writer = self
            .resume_or_begin(&ctx, &resource, &digest, compressor, start)
            .await?;
        // Bytes of `data` received in this call (compressed ones for a
        // compressed upload): the next message's offset is `start + sent`.
        let mut sent: i64 = 0;
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
                        let committed_size = match compressor {
                            None => digest.size as i64,
                            Some(_) => {
                                Stats::add(&self.backend.stats.client_compressed_blobs, 1);
                                start + sent
                            }
                        };
                        return Ok(WriteResponse { committed_size });
                    }
                    Ok(None) => {
                        // The client closed without finish_write: keep what
                        // we have so it can resume, and say how much that is.
                        let committed = self.parked.park(resource, writer);
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
            if req.write_offset != start + sent {
                return Err(Error::InvalidArgument(format!(
                    "write_offset {} is not the first offset {start} plus the {sent} bytes sent \
                     since in this call",
                    req.write_offset
                )));
            }
            if !req.data.is_empty() {
                sent += req.data.len() as i64;
                writer.write(Bytes::from(req.data)).await?;
            }
            finished = req.finish_write;
        }
    }

    /// The writer for a Write starting at plain offset `start`: a new one
    /// at 0, else the upload parked under `resource` if it has received
    /// exactly `start` bytes (INVALID_ARGUMENT otherwise; the parked upload
    /// stays).
    async fn resume_or_begin(
        &self,
        ctx: &RequestContext,
        resource: &str,
        digest: &Digest,
        compressor: Option<Compressor>,
        start: i64,
    ) -> Result<Box<dyn BlobWriter>> {
        match (start, self.parked.take(resource)) {
            (0, _) => match compressor {
                None => self.backend.blobs.begin_write(ctx, digest).await,
                Some(c) => {
                    let blobs = &self.backend.blobs;
                    blobs.begin_write_compressed(ctx, digest, c).await
                }
            },
            (offset, Some(writer)) if offset as u64 == writer.committed_size() => Ok(writer),
            (offset, parked) => {
                let committed = parked.as_ref().map_or(0, |w| w.committed_size());
                if let Some(writer) = parked {
                    self.parked.park(resource.to_string(), writer);
                }
                Err(Error::InvalidArgument(format!(
                    "write_offset {offset} does not match the committed size {committed} of {}",
                    clip(resource)
                )))
            }
        }
    }
}
