//! ContentAddressableStorage: FindMissingBlobs, Batch{Update,Read}Blobs, GetTree.
//!
//! Batch entries may be zstd-compressed both ways: an update entry with
//! `compressor` = ZSTD is decoded (bounded by its declared size) before the
//! usual verified write; a read that accepts ZSTD gets each blob compressed
//! when that saves at least 10%.

use std::pin::Pin;
use std::sync::Arc;

use bazel_remote_apis::build::bazel::remote::execution::v2::{
    self as re, BatchReadBlobsRequest, BatchReadBlobsResponse, BatchUpdateBlobsRequest,
    BatchUpdateBlobsResponse, FindMissingBlobsRequest, FindMissingBlobsResponse, GetTreeRequest,
    GetTreeResponse, batch_read_blobs_response, batch_update_blobs_response, compressor,
    content_addressable_storage_server::ContentAddressableStorage,
};
use bytes::Bytes;
use futures::Stream;
use prost::Message;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use crate::compression::{self, Compressor};
use crate::context::RequestContext;
use crate::digest::{Digest, DigestFunction};
use crate::error::{Error, Result, clip, ok_rpc_status};
use crate::prefetch::ClientInputs;
use crate::reapi::tree::TreeWalk;
use crate::service::Backend;
use crate::stats::Stats;

/// Directories per GetTree page when the client does not ask for a size.
const DEFAULT_TREE_PAGE: usize = 1000;
/// Upper bound on a GetTree page, in directories and in encoded bytes.
const MAX_TREE_PAGE: usize = 10_000;
const MAX_TREE_PAGE_BYTES: usize = 2 << 20;

/// Serves the CAS from the backend's blob store.
pub struct CasService {
    backend: Backend,
    /// Told of the digests clients name in FindMissingBlobs (prefetch learns
    /// which outputs later actions take as inputs), if any.
    inputs: Option<Arc<dyn ClientInputs>>,
}

impl CasService {
    /// A CAS service over `backend`.
    pub fn new(backend: Backend) -> Self {
        CasService {
            backend,
            inputs: None,
        }
    }

    /// Tells `inputs` (if any) of every client FindMissingBlobs from now on.
    pub fn with_inputs(mut self, inputs: Option<Arc<dyn ClientInputs>>) -> Self {
        self.inputs = inputs;
        self
    }

    fn check_batch_size(&self, total: u64, what: &str) -> Result<()> {
        let limit = self.backend.max_batch_total_size_bytes;
        if total > limit {
            return Err(Error::InvalidArgument(format!(
                "{what} totals {total} bytes, over the {limit}-byte max_batch_total_size_bytes; \
                 use ByteStream for large blobs"
            )));
        }
        Ok(())
    }

    async fn find_missing(
        &self,
        metadata: &MetadataMap,
        req: FindMissingBlobsRequest,
    ) -> Result<FindMissingBlobsResponse> {
        let first = req.blob_digests.first().map(|d| d.hash.as_str());
        let function = DigestFunction::for_request(req.digest_function, first)?;
        let digests = req
            .blob_digests
            .iter()
            .map(|d| Digest::parse(function, &d.hash, d.size_bytes))
            .collect::<Result<Vec<_>>>()?;
        let ctx = RequestContext::from_metadata(req.instance_name, metadata);
        if let Some(inputs) = &self.inputs {
            inputs.named(&ctx, &digests);
        }
        let missing = self.backend.blobs.find_missing(&ctx, &digests).await?;
        Ok(FindMissingBlobsResponse {
            missing_blob_digests: missing.iter().map(Digest::to_proto).collect(),
        })
    }

    async fn batch_update(
        &self,
        metadata: &MetadataMap,
        req: BatchUpdateBlobsRequest,
    ) -> Result<BatchUpdateBlobsResponse> {
        let first = req.requests.first().and_then(|r| r.digest.as_ref());
        let function =
            DigestFunction::for_request(req.digest_function, first.map(|d| d.hash.as_str()))?;
        let total: u64 = req.requests.iter().map(entry_size).sum();
        self.check_batch_size(total, "BatchUpdateBlobs request")?;
        // One (client digest, verdict) per request entry, in order.
        let mut verdicts: Vec<(Option<re::Digest>, Result<()>)> = Vec::new();
        let mut blobs = Vec::new();
        let mut positions = Vec::new();
        let mut compressed = 0;
        for (i, r) in req.requests.into_iter().enumerate() {
            let parsed = Digest::from_proto(function, r.digest.as_ref()).and_then(|d| {
                let data = match Compressor::from_proto(r.compressor)
                    .map_err(|e| Error::InvalidArgument(format!("blob {d}: {e}")))?
                {
                    None => Bytes::from(r.data),
                    Some(Compressor::Zstd) => {
                        compressed += 1;
                        // Bounded by the declared size: a bomb stops there.
                        compression::decompress(&r.data, d.size)
                            .map_err(|e| Error::InvalidArgument(format!("blob {d}: {e}")))?
                    }
                };
                Ok((d, data))
            });
            let verdict = match parsed {
                Ok(blob) => {
                    blobs.push(blob);
                    positions.push(i);
                    Ok(())
                }
                Err(e) => Err(e),
            };
            verdicts.push((r.digest, verdict));
        }
        Stats::add(&self.backend.stats.client_compressed_blobs, compressed);
        let ctx = RequestContext::from_metadata(req.instance_name, metadata);
        let results = self.backend.blobs.write_many(&ctx, blobs).await;
        for (pos, result) in positions.into_iter().zip(results) {
            verdicts[pos].1 = result;
        }
        Ok(BatchUpdateBlobsResponse {
            responses: verdicts
                .into_iter()
                .map(|(digest, verdict)| batch_update_blobs_response::Response {
                    digest,
                    status: Some(match verdict {
                        Ok(()) => ok_rpc_status(),
                        Err(e) => e.to_rpc_status(),
                    }),
                })
                .collect(),
        })
    }

    async fn batch_read(
        &self,
        metadata: &MetadataMap,
        req: BatchReadBlobsRequest,
    ) -> Result<BatchReadBlobsResponse> {
        let first = req.digests.first().map(|d| d.hash.as_str());
        let function = DigestFunction::for_request(req.digest_function, first)?;
        let total: u64 = req.digests.iter().map(|d| d.size_bytes.max(0) as u64).sum();
        self.check_batch_size(total, "BatchReadBlobs request")?;
        let parsed: Vec<Result<Digest>> = req
            .digests
            .iter()
            .map(|d| Digest::parse(function, &d.hash, d.size_bytes))
            .collect();
        let valid: Vec<Digest> = parsed
            .iter()
            .filter_map(|p| p.as_ref().ok().copied())
            .collect();
        let ctx = RequestContext::from_metadata(req.instance_name, metadata);
        let reads = self.backend.blobs.read_many(&ctx, &valid).await;
        let zstd = Compressor::Zstd.to_proto();
        let reads = if req.acceptable_compressors.contains(&zstd) {
            encode_worthwhile(reads).await
        } else {
            reads.into_iter().map(|r| r.map(|d| (d, None))).collect()
        };
        let compressed = reads
            .iter()
            .filter(|r| matches!(r, Ok((_, Some(_)))))
            .count();
        Stats::add(
            &self.backend.stats.client_compressed_blobs,
            compressed as u64,
        );
        let mut reads = reads.into_iter();
        let responses = req
            .digests
            .into_iter()
            .zip(parsed)
            .map(|(wire, parsed)| {
                let read = parsed.and_then(|_| reads.next().expect("one read per valid digest"));
                let (data, compressor, status) = match read {
                    Ok((data, compressor)) => (
                        data.to_vec(),
                        compressor.map_or(compressor::Value::Identity as i32, |c| c.to_proto()),
                        ok_rpc_status(),
                    ),
                    Err(e) => (
                        Vec::new(),
                        compressor::Value::Identity as i32,
                        e.to_rpc_status(),
                    ),
                };
                batch_read_blobs_response::Response {
                    digest: Some(wire),
                    data,
                    compressor,
                    status: Some(status),
                }
            })
            .collect();
        Ok(BatchReadBlobsResponse { responses })
    }
}

/// What a BatchUpdateBlobs entry counts against `max_batch_total_size_bytes`:
/// the blob's size (REAPI counts blobs, so a compressed entry counts its
/// uncompressed size), and never less than the bytes it carries.
fn entry_size(r: &re::batch_update_blobs_request::Request) -> u64 {
    let declared = r.digest.as_ref().map_or(0, |d| d.size_bytes.max(0) as u64);
    (r.data.len() as u64).max(declared)
}

/// Batch reads of up to this many bytes are compressed on the async worker:
/// a thread hop would cost more than compressing them.
const INLINE_ENCODE_BYTES: usize = 256 << 10;

/// Compresses each blob read when that saves at least 10%
/// ([`compression::worth_it`]), off the async workers unless the batch is
/// small; the others stay plain (`None`).
async fn encode_worthwhile(reads: Vec<Result<Bytes>>) -> Vec<Result<(Bytes, Option<Compressor>)>> {
    let bytes: usize = reads.iter().map(|r| r.as_ref().map_or(0, Bytes::len)).sum();
    if bytes <= INLINE_ENCODE_BYTES {
        return encode_each(reads);
    }
    let n = reads.len();
    tokio::task::spawn_blocking(move || encode_each(reads))
        .await
        .unwrap_or_else(|e| {
            (0..n)
                .map(|_| Err(Error::Internal(format!("batch compression failed: {e}"))))
                .collect()
        })
}

fn encode_each(reads: Vec<Result<Bytes>>) -> Vec<Result<(Bytes, Option<Compressor>)>> {
    reads
        .into_iter()
        .map(|read| {
            read.map(|data| {
                let packed = compression::compress(&data);
                if compression::worth_it(data.len() as u64, packed.len() as u64) {
                    (packed, Some(Compressor::Zstd))
                } else {
                    (data, None)
                }
            })
        })
        .collect()
}

/// Parses a GetTree page token: the number of directories already returned.
fn parse_page_token(token: &str) -> Result<usize> {
    if token.is_empty() {
        return Ok(0);
    }
    token.parse().map_err(|_| {
        Error::InvalidArgument(format!("invalid GetTree page_token {:?}", clip(token)))
    })
}

/// Streams the directories under `root` breadth-first, deduplicated,
/// starting after `skip` of them, in pages of at most `page` directories
/// (see [`TreeWalk`]: one `read_many` per level of the tree).
async fn stream_tree(
    backend: Backend,
    ctx: RequestContext,
    root: Digest,
    skip: usize,
    page: usize,
    tx: tokio::sync::mpsc::Sender<std::result::Result<GetTreeResponse, Status>>,
) {
    if let Err(e) = walk_tree(&backend, &ctx, root, skip, page, &tx).await {
        let _ = tx.send(Err(e.into())).await;
    }
}

async fn walk_tree(
    backend: &Backend,
    ctx: &RequestContext,
    root: Digest,
    skip: usize,
    page: usize,
    tx: &tokio::sync::mpsc::Sender<std::result::Result<GetTreeResponse, Status>>,
) -> Result<()> {
    let mut walk = TreeWalk::new(&*backend.blobs, ctx, [root]);
    let mut position = 0usize;
    let mut current = GetTreeResponse::default();
    let mut current_bytes = 0usize;
    while let Some(level) = walk.next_level().await? {
        let len = level.len();
        for (i, (digest, dir)) in level.into_iter().enumerate() {
            let Some(dir) = dir else {
                if digest == root {
                    return Err(Error::NotFound(format!("root directory {root} not found")));
                }
                // The spec: return the part of the tree that is present.
                continue;
            };
            position += 1;
            if position <= skip {
                continue;
            }
            current_bytes += dir.encoded_len();
            current.directories.push(dir);
            if current.directories.len() >= page || current_bytes >= MAX_TREE_PAGE_BYTES {
                let more = i + 1 < len || !walk.is_done();
                current.next_page_token = if more {
                    position.to_string()
                } else {
                    String::new()
                };
                if tx.send(Ok(std::mem::take(&mut current))).await.is_err() {
                    return Ok(());
                }
                current_bytes = 0;
            }
        }
    }
    if !current.directories.is_empty() || position <= skip {
        let _ = tx.send(Ok(current)).await;
    }
    Ok(())
}

type TreeStream = Pin<Box<dyn Stream<Item = std::result::Result<GetTreeResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ContentAddressableStorage for CasService {
    async fn find_missing_blobs(
        &self,
        request: Request<FindMissingBlobsRequest>,
    ) -> std::result::Result<Response<FindMissingBlobsResponse>, Status> {
        let (metadata, _, req) = request.into_parts();
        Ok(Response::new(self.find_missing(&metadata, req).await?))
    }

    async fn batch_update_blobs(
        &self,
        request: Request<BatchUpdateBlobsRequest>,
    ) -> std::result::Result<Response<BatchUpdateBlobsResponse>, Status> {
        let (metadata, _, req) = request.into_parts();
        Ok(Response::new(self.batch_update(&metadata, req).await?))
    }

    async fn batch_read_blobs(
        &self,
        request: Request<BatchReadBlobsRequest>,
    ) -> std::result::Result<Response<BatchReadBlobsResponse>, Status> {
        let (metadata, _, req) = request.into_parts();
        Ok(Response::new(self.batch_read(&metadata, req).await?))
    }

    type GetTreeStream = TreeStream;

    async fn get_tree(
        &self,
        request: Request<GetTreeRequest>,
    ) -> std::result::Result<Response<Self::GetTreeStream>, Status> {
        let (metadata, _, req) = request.into_parts();
        let first = req.root_digest.as_ref().map(|d| d.hash.as_str());
        let function = DigestFunction::for_request(req.digest_function, first)?;
        let root = Digest::from_proto(function, req.root_digest.as_ref())?;
        let ctx = RequestContext::from_metadata(req.instance_name, &metadata);
        let skip = parse_page_token(&req.page_token)?;
        if req.page_size < 0 {
            return Err(Error::InvalidArgument("page_size must not be negative".into()).into());
        }
        let page = match req.page_size as usize {
            0 => DEFAULT_TREE_PAGE,
            n => n.min(MAX_TREE_PAGE),
        };
        if self
            .backend
            .blobs
            .find_missing(&ctx, &[root])
            .await?
            .contains(&root)
        {
            return Err(Error::NotFound(format!("root directory {root} not found")).into());
        }
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(stream_tree(self.backend.clone(), ctx, root, skip, page, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn split_blob(
        &self,
        _request: Request<re::SplitBlobRequest>,
    ) -> std::result::Result<Response<re::SplitBlobResponse>, Status> {
        Err(Status::unimplemented("SplitBlob is not supported"))
    }

    async fn splice_blob(
        &self,
        _request: Request<re::SpliceBlobRequest>,
    ) -> std::result::Result<Response<re::SpliceBlobResponse>, Status> {
        Err(Status::unimplemented("SpliceBlob is not supported"))
    }

    type GetChunkMappingStream = Pin<
        Box<dyn Stream<Item = std::result::Result<re::GetChunkMappingResponse, Status>> + Send>,
    >;

    async fn get_chunk_mapping(
        &self,
        _request: Request<re::GetChunkMappingRequest>,
    ) -> std::result::Result<Response<Self::GetChunkMappingStream>, Status> {
        Err(Status::unimplemented("GetChunkMapping is not supported"))
    }

    async fn register_chunk_mapping(
        &self,
        _request: Request<tonic::Streaming<re::RegisterChunkMappingRequest>>,
    ) -> std::result::Result<Response<re::RegisterChunkMappingResponse>, Status> {
        Err(Status::unimplemented(
            "RegisterChunkMapping is not supported",
        ))
    }
}
