//! Remote Asset Fetch and Push: validates requests into
//! [`AssetRequest`]s, calls the [`Fetcher`] and [`Pusher`], and maps their
//! outcomes to responses. Outpost's own failures are gRPC errors; a miss or
//! an origin failure goes inline in the response's `status`.

use std::sync::Arc;

use bazel_remote_apis::build::bazel::remote::asset::v1::{
    FetchBlobRequest, FetchBlobResponse, FetchDirectoryRequest, FetchDirectoryResponse,
    PushBlobRequest, PushBlobResponse, PushDirectoryRequest, PushDirectoryResponse, fetch_server,
    push_server,
};
use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use bazel_remote_apis::google::rpc;
use tonic::metadata::MetadataMap;
use tonic::{Code, Request, Response, Status};

use crate::asset::fetch::{FetchOutcome, Fetcher};
use crate::asset::push::Pusher;
use crate::asset::request::{AssetRequest, timestamp, timestamp_secs};
use crate::asset::upstream::PushedContent;
use crate::context::RequestContext;
use crate::digest::{Digest, DigestFunction};
use crate::error::{Error, Result};
use crate::store::asset_index::AssetKind;

/// The digest an inline FetchBlob error carries: non-empty and held by no
/// CAS, so that Bazel before 8.2, which ignores the inline status and reads
/// `blob_digest`, fails instead of writing an empty file.
pub fn missing_blob_digest() -> re::Digest {
    re::Digest {
        hash: "1".repeat(64),
        size_bytes: 1,
    }
}

/// Serves the Fetch and Push services.
pub struct AssetService {
    fetcher: Arc<Fetcher>,
    pusher: Arc<Pusher>,
}

impl AssetService {
    /// Serves fetches with `fetcher` and pushes with `pusher`.
    pub fn new(fetcher: Arc<Fetcher>, pusher: Arc<Pusher>) -> Self {
        AssetService { fetcher, pusher }
    }

    async fn fetch(
        &self,
        metadata: &MetadataMap,
        request: AssetRequest,
        kind: AssetKind,
    ) -> Result<Answer> {
        let ctx = RequestContext::from_metadata(request.instance.clone(), metadata);
        let function = request.digest_function;
        let outcome = self.fetcher.fetch(&ctx, request, kind).await?;
        Ok(Answer { outcome, function })
    }

    async fn push(
        &self,
        metadata: &MetadataMap,
        request: AssetRequest,
        kind: AssetKind,
        push: PushFields,
    ) -> Result<()> {
        let function = request.digest_function;
        let digests = |list: &[re::Digest]| -> Result<Vec<Digest>> {
            list.iter()
                .map(|d| Digest::from_proto(function, Some(d)))
                .collect()
        };
        let Some(root) = push.root.as_ref() else {
            return Err(Error::InvalidArgument(match kind {
                AssetKind::Blob => "blob_digest is required".into(),
                AssetKind::Directory => "root_directory_digest is required".into(),
            }));
        };
        let pushed = PushedContent {
            kind,
            root: Digest::from_proto(function, Some(root))?,
            references_blobs: digests(&push.references_blobs)?,
            references_directories: digests(&push.references_directories)?,
            expire_at: timestamp_secs(push.expire_at.as_ref()),
        };
        let ctx = RequestContext::from_metadata(request.instance.clone(), metadata);
        self.pusher.push(&ctx, &request, &pushed).await
    }
}

/// The Push fields beyond what [`AssetRequest`] holds.
struct PushFields {
    root: Option<re::Digest>,
    references_blobs: Vec<re::Digest>,
    references_directories: Vec<re::Digest>,
    expire_at: Option<bazel_remote_apis::google::protobuf::Timestamp>,
}

/// A fetch outcome, with the digest function to answer in.
struct Answer {
    outcome: FetchOutcome,
    function: DigestFunction,
}

/// The response fields both Fetch methods share.
struct Fields {
    status: rpc::Status,
    uri: String,
    qualifiers: Vec<bazel_remote_apis::build::bazel::remote::asset::v1::Qualifier>,
    expires_at: Option<bazel_remote_apis::google::protobuf::Timestamp>,
    /// `None` for an inline error.
    digest: Option<re::Digest>,
    digest_function: i32,
}

impl Answer {
    fn fields(self) -> Fields {
        let digest_function = self.function.to_proto();
        match self.outcome {
            FetchOutcome::Found { record, .. } => Fields {
                status: rpc::Status {
                    code: Code::Ok as i32,
                    ..Default::default()
                },
                uri: record.uri,
                qualifiers: record.qualifiers,
                expires_at: timestamp(record.expire_at),
                digest: record.digest,
                digest_function,
            },
            FetchOutcome::Failed { uri, code, message } => Fields {
                status: rpc::Status {
                    code: code as i32,
                    message,
                    details: Vec::new(),
                },
                uri,
                qualifiers: Vec::new(),
                expires_at: None,
                digest: None,
                digest_function,
            },
        }
    }
}

#[tonic::async_trait]
impl fetch_server::Fetch for AssetService {
    async fn fetch_blob(
        &self,
        request: Request<FetchBlobRequest>,
    ) -> std::result::Result<Response<FetchBlobResponse>, Status> {
        let (metadata, _, req) = request.into_parts();
        let parsed = AssetRequest::parse(
            req.instance_name,
            req.uris,
            req.qualifiers,
            req.digest_function,
        )?
        .with_fetch_limits(req.timeout.as_ref(), req.oldest_content_accepted.as_ref())?;
        let f = self
            .fetch(&metadata, parsed, AssetKind::Blob)
            .await?
            .fields();
        Ok(Response::new(FetchBlobResponse {
            // An inline error still names a digest (see missing_blob_digest).
            blob_digest: Some(f.digest.unwrap_or_else(missing_blob_digest)),
            status: Some(f.status),
            uri: f.uri,
            qualifiers: f.qualifiers,
            expires_at: f.expires_at,
            digest_function: f.digest_function,
        }))
    }

    async fn fetch_directory(
        &self,
        request: Request<FetchDirectoryRequest>,
    ) -> std::result::Result<Response<FetchDirectoryResponse>, Status> {
        let (metadata, _, req) = request.into_parts();
        let parsed = AssetRequest::parse(
            req.instance_name,
            req.uris,
            req.qualifiers,
            req.digest_function,
        )?
        .with_fetch_limits(req.timeout.as_ref(), req.oldest_content_accepted.as_ref())?;
        let f = self
            .fetch(&metadata, parsed, AssetKind::Directory)
            .await?
            .fields();
        Ok(Response::new(FetchDirectoryResponse {
            root_directory_digest: f.digest,
            status: Some(f.status),
            uri: f.uri,
            qualifiers: f.qualifiers,
            expires_at: f.expires_at,
            digest_function: f.digest_function,
        }))
    }
}

#[tonic::async_trait]
impl push_server::Push for AssetService {
    async fn push_blob(
        &self,
        request: Request<PushBlobRequest>,
    ) -> std::result::Result<Response<PushBlobResponse>, Status> {
        let (metadata, _, req) = request.into_parts();
        // The root digest's length names the function when the field does not.
        let first = req.blob_digest.as_ref().map(|d| d.hash.as_str());
        let function = DigestFunction::for_request(req.digest_function, first)?;
        let parsed = AssetRequest::parse(
            req.instance_name,
            req.uris,
            req.qualifiers,
            function.to_proto(),
        )?;
        let fields = PushFields {
            root: req.blob_digest,
            references_blobs: req.references_blobs,
            references_directories: req.references_directories,
            expire_at: req.expire_at,
        };
        self.push(&metadata, parsed, AssetKind::Blob, fields)
            .await?;
        Ok(Response::new(PushBlobResponse {}))
    }

    async fn push_directory(
        &self,
        request: Request<PushDirectoryRequest>,
    ) -> std::result::Result<Response<PushDirectoryResponse>, Status> {
        let (metadata, _, req) = request.into_parts();
        // The root digest's length names the function when the field does not.
        let first = req.root_directory_digest.as_ref().map(|d| d.hash.as_str());
        let function = DigestFunction::for_request(req.digest_function, first)?;
        let parsed = AssetRequest::parse(
            req.instance_name,
            req.uris,
            req.qualifiers,
            function.to_proto(),
        )?;
        let fields = PushFields {
            root: req.root_directory_digest,
            references_blobs: req.references_blobs,
            references_directories: req.references_directories,
            expire_at: req.expire_at,
        };
        self.push(&metadata, parsed, AssetKind::Directory, fields)
            .await?;
        Ok(Response::new(PushDirectoryResponse {}))
    }
}
