//! Capabilities and ContentAddressableStorage of the fake: blobs verified on
//! the way in, Batch* limited to the advertised batch size, GetTree
//! breadth-first with page tokens, the chunking RPCs unimplemented.

use std::collections::{HashSet, VecDeque};
use std::pin::Pin;

use bytes::Bytes;
use prost::Message;
use tonic::{Code, Request, Response, Status, Streaming};

use super::call::{Entry, Logged, logged_by_instance};
use super::compression::decompress_in;
use super::state::{Shared, check_digest, rpc_status, verify};
use super::{Method, Svc};
use crate::re;
use re::capabilities_server::Capabilities;
use re::content_addressable_storage_server::ContentAddressableStorage;

/// A boxed response stream, as the server traits want them.
pub(super) type BoxStream<T> = Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send>>;

logged_by_instance!(
    re::GetCapabilitiesRequest,
    re::SplitBlobRequest,
    re::SpliceBlobRequest,
    re::GetChunkMappingRequest,
);

impl Logged for re::FindMissingBlobsRequest {
    fn entry(&self, _: &Shared) -> Entry {
        Entry::new(&self.instance_name, self.blob_digests.clone())
    }
}

impl Logged for re::BatchUpdateBlobsRequest {
    fn entry(&self, _: &Shared) -> Entry {
        let digests = self.requests.iter();
        Entry {
            bytes_received: self.requests.iter().map(|r| r.data.len() as u64).sum(),
            ..Entry::new(
                &self.instance_name,
                digests
                    .map(|r| r.digest.clone().unwrap_or_default())
                    .collect(),
            )
        }
    }
}

impl Logged for re::BatchReadBlobsRequest {
    fn entry(&self, _: &Shared) -> Entry {
        Entry::new(&self.instance_name, self.digests.clone())
    }
}

impl Logged for re::GetTreeRequest {
    fn entry(&self, _: &Shared) -> Entry {
        let root = self.root_digest.clone().unwrap_or_default();
        Entry::new(&self.instance_name, vec![root])
    }
}

impl Shared {
    /// FindMissingBlobs.
    fn find_missing(
        &self,
        req: &re::FindMissingBlobsRequest,
    ) -> Result<re::FindMissingBlobsResponse, Status> {
        self.check_function(req.digest_function)?;
        for d in &req.blob_digests {
            check_digest(d, req.digest_function)?;
        }
        Ok(re::FindMissingBlobsResponse {
            missing_blob_digests: req
                .blob_digests
                .iter()
                .filter(|d| !self.has(d))
                .cloned()
                .collect(),
        })
    }

    /// BatchUpdateBlobs; `compressed` counts the entries sent compressed.
    pub(super) fn batch_update(
        &self,
        req: re::BatchUpdateBlobsRequest,
        compressed: &mut u64,
    ) -> Result<re::BatchUpdateBlobsResponse, Status> {
        self.check_function(req.digest_function)?;
        let total: u64 = req.requests.iter().map(|r| r.data.len() as u64).sum();
        let max = self.max_batch();
        if max > 0 && total > max as u64 {
            return Err(Status::invalid_argument(format!(
                "fake upstream: BatchUpdateBlobs of {total} bytes exceeds max_batch_total_size_bytes {max}"
            )));
        }
        let mut responses = Vec::with_capacity(req.requests.len());
        for r in req.requests {
            let digest = r.digest.unwrap_or_default();
            let zstd = re::compressor::Value::Zstd as i32;
            let plain = match r.compressor {
                0 => Ok(r.data),
                c if c == zstd && self.zstd_batch_update_on() => {
                    *compressed += 1;
                    decompress_in(&r.data, digest.size_bytes)
                }
                _ => Err(Status::invalid_argument(
                    "fake upstream: compressor not supported",
                )),
            };
            let status = match plain.and_then(|data| {
                check_digest(&digest, req.digest_function)?;
                verify(&digest, req.digest_function, &data)?;
                Ok(data)
            }) {
                Ok(data) => {
                    self.store(&digest, Bytes::from(data));
                    rpc_status(Code::Ok, "")
                }
                Err(e) => rpc_status(e.code(), e.message()),
            };
            responses.push(re::batch_update_blobs_response::Response {
                digest: Some(digest),
                status: Some(status),
            });
        }
        Ok(re::BatchUpdateBlobsResponse { responses })
    }

    pub(super) fn batch_read(
        &self,
        req: &re::BatchReadBlobsRequest,
    ) -> Result<re::BatchReadBlobsResponse, Status> {
        self.check_function(req.digest_function)?;
        let total: u64 = req.digests.iter().map(|d| d.size_bytes.max(0) as u64).sum();
        let max = self.max_batch();
        if max > 0 && total > max as u64 {
            return Err(Status::invalid_argument(format!(
                "fake upstream: BatchReadBlobs of {total} bytes exceeds max_batch_total_size_bytes {max}"
            )));
        }
        // Every entry found goes compressed when the reader accepts zstd
        // and it is on (a real server may choose per entry).
        let zstd = re::compressor::Value::Zstd as i32;
        let compress = self.zstd_on() && req.acceptable_compressors.contains(&zstd);
        let mut responses = Vec::with_capacity(req.digests.len());
        for d in &req.digests {
            let (data, status) = match check_digest(d, req.digest_function) {
                Err(e) => (Vec::new(), rpc_status(e.code(), e.message())),
                Ok(()) => match self.blob(d) {
                    Some(data) => (data.to_vec(), rpc_status(Code::Ok, "")),
                    None => (
                        Vec::new(),
                        rpc_status(Code::NotFound, "fake upstream: blob not found"),
                    ),
                },
            };
            let found = status.code == Code::Ok as i32;
            let (data, compressor) = if compress && found {
                (self.compress_out(&data), zstd)
            } else {
                (data, 0)
            };
            responses.push(re::batch_read_blobs_response::Response {
                digest: Some(d.clone()),
                data,
                compressor,
                status: Some(status),
            });
        }
        Ok(re::BatchReadBlobsResponse { responses })
    }

    /// Every Directory reachable from `root`, breadth-first, deduplicated;
    /// missing subtrees are skipped. `None` if the root is missing.
    fn tree(&self, root: &re::Digest) -> Option<Vec<re::Directory>> {
        let root_data = self.blob(root)?;
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        let mut queue = VecDeque::new();
        seen.insert((root.hash.clone(), root.size_bytes));
        queue.push_back(root_data);
        while let Some(data) = queue.pop_front() {
            let Ok(dir) = re::Directory::decode(data) else {
                continue;
            };
            for child in dir.directories.iter().filter_map(|n| n.digest.as_ref()) {
                if seen.insert((child.hash.clone(), child.size_bytes))
                    && let Some(data) = self.blob(child)
                {
                    queue.push_back(data);
                }
            }
            out.push(dir);
        }
        Some(out)
    }

    /// GetTree: every page of the tree under the request's root.
    fn tree_pages(&self, req: &re::GetTreeRequest) -> Result<Vec<re::GetTreeResponse>, Status> {
        let root = req.root_digest.clone().unwrap_or_default();
        self.check_function(req.digest_function)?;
        check_digest(&root, req.digest_function)?;
        let dirs = self
            .tree(&root)
            .ok_or_else(|| Status::not_found("fake upstream: GetTree root not found"))?;
        let start: usize = if req.page_token.is_empty() {
            0
        } else {
            req.page_token
                .parse()
                .map_err(|_| Status::invalid_argument("fake upstream: bad page_token"))?
        };
        let page = if req.page_size > 0 {
            req.page_size as usize
        } else {
            1000
        };
        let dirs: Vec<re::Directory> = dirs.into_iter().skip(start).collect();
        let mut pages = Vec::new();
        let mut next = start;
        for chunk in dirs.chunks(page) {
            next += chunk.len();
            pages.push(re::GetTreeResponse {
                directories: chunk.to_vec(),
                next_page_token: next.to_string(),
            });
        }
        if let Some(last) = pages.last_mut() {
            last.next_page_token.clear();
        }
        Ok(pages)
    }
}

#[tonic::async_trait]
impl Capabilities for Svc {
    async fn get_capabilities(
        &self,
        request: Request<re::GetCapabilitiesRequest>,
    ) -> Result<Response<re::ServerCapabilities>, Status> {
        self.unary(Method::GetCapabilities, request, |_, _| Ok(self.s.caps()))
            .await
    }
}

#[tonic::async_trait]
impl ContentAddressableStorage for Svc {
    async fn find_missing_blobs(
        &self,
        request: Request<re::FindMissingBlobsRequest>,
    ) -> Result<Response<re::FindMissingBlobsResponse>, Status> {
        self.unary(Method::FindMissingBlobs, request, |_, req| {
            self.s.find_missing(&req)
        })
        .await
    }

    async fn batch_update_blobs(
        &self,
        request: Request<re::BatchUpdateBlobsRequest>,
    ) -> Result<Response<re::BatchUpdateBlobsResponse>, Status> {
        self.unary(Method::BatchUpdateBlobs, request, |guard, req| {
            let mut compressed = 0;
            let resp = self.s.batch_update(req, &mut compressed);
            guard.update(|c| c.compressed_blobs += compressed);
            resp
        })
        .await
    }

    async fn batch_read_blobs(
        &self,
        request: Request<re::BatchReadBlobsRequest>,
    ) -> Result<Response<re::BatchReadBlobsResponse>, Status> {
        self.unary(Method::BatchReadBlobs, request, |guard, req| {
            let resp = self.s.batch_read(&req)?;
            guard.add_sent(resp.responses.iter().map(|r| r.data.len() as u64).sum());
            let compressed = resp.responses.iter().filter(|r| r.compressor != 0).count();
            guard.update(|c| c.compressed_blobs += compressed as u64);
            Ok(resp)
        })
        .await
    }

    type GetTreeStream = BoxStream<re::GetTreeResponse>;

    async fn get_tree(
        &self,
        request: Request<re::GetTreeRequest>,
    ) -> Result<Response<Self::GetTreeStream>, Status> {
        self.unary(Method::GetTree, request, |guard, req| {
            let pages = self.s.tree_pages(&req)?;
            let dirs = pages.iter().flat_map(|p| &p.directories);
            guard.add_sent(dirs.map(|d| d.encoded_len() as u64).sum());
            let stream: Self::GetTreeStream =
                Box::pin(futures::stream::iter(pages.into_iter().map(Ok)));
            Ok(stream)
        })
        .await
    }

    async fn split_blob(
        &self,
        request: Request<re::SplitBlobRequest>,
    ) -> Result<Response<re::SplitBlobResponse>, Status> {
        self.unimplemented(Method::SplitBlob, request).await
    }

    type GetChunkMappingStream = BoxStream<re::GetChunkMappingResponse>;

    async fn get_chunk_mapping(
        &self,
        request: Request<re::GetChunkMappingRequest>,
    ) -> Result<Response<Self::GetChunkMappingStream>, Status> {
        self.unimplemented(Method::GetChunkMapping, request).await
    }

    async fn splice_blob(
        &self,
        request: Request<re::SpliceBlobRequest>,
    ) -> Result<Response<re::SpliceBlobResponse>, Status> {
        self.unimplemented(Method::SpliceBlob, request).await
    }

    async fn register_chunk_mapping(
        &self,
        request: Request<Streaming<re::RegisterChunkMappingRequest>>,
    ) -> Result<Response<re::RegisterChunkMappingResponse>, Status> {
        let headers = request.metadata().clone();
        let guard = self
            .s
            .begin(Method::RegisterChunkMapping, Entry::default(), &headers)
            .await?;
        let result = Err(Status::unimplemented(
            "fake upstream: RegisterChunkMapping is not implemented",
        ));
        guard.complete(&result);
        result
    }
}
