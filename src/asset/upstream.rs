//! The upstream behind the asset service (proxy mode): its Remote Asset
//! endpoint (own connection, health and retry policy, and a memory of an
//! UNIMPLEMENTED answer), and its CAS through the proxy store, which pulls
//! an entry's content into the local store and makes sure the upstream
//! holds what a forwarded Push names.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bazel_remote_apis::build::bazel::remote::asset::v1::{
    FetchBlobRequest, FetchBlobResponse, FetchDirectoryRequest, FetchDirectoryResponse,
    PushBlobRequest, PushDirectoryRequest,
};
use bazel_remote_apis::google::protobuf::Timestamp;

use crate::asset::content::Content;
use crate::asset::request::{AssetRequest, timestamp};
use crate::context::RequestContext;
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::stats::UpstreamMethod;
use crate::store::BlobStore;
use crate::store::asset_index::AssetKind;
use crate::store::read_through::ReadThrough;
use crate::store::write_back::UploadQueue;
use crate::upstream::Upstream;

/// How long an UNIMPLEMENTED answer is believed before asking again.
pub const UNIMPLEMENTED_RETRY: Duration = Duration::from_secs(600);

/// What a Push names: its kind, root, references and expiry.
#[derive(Clone, Debug)]
pub struct PushedContent {
    /// Blob or directory.
    pub kind: AssetKind,
    /// The blob, or the root Directory.
    pub root: Digest,
    /// `references_blobs`.
    pub references_blobs: Vec<Digest>,
    /// `references_directories`.
    pub references_directories: Vec<Digest>,
    /// `expire_at` (unix seconds; 0 = never).
    pub expire_at: i64,
}

impl PushedContent {
    /// The content that must be in a CAS before the Push is accepted.
    pub fn content(&self) -> Content {
        Content::of_push(
            self.kind,
            self.root,
            &self.references_blobs,
            &self.references_directories,
        )
    }
}

/// The upstream's asset service and CAS, as the asset service uses them.
pub struct AssetUpstream {
    /// The connection to `[upstream] asset_endpoint`.
    client: Upstream,
    /// The proxy CAS: reads pull into the local store; FindMissingBlobs
    /// answers for the upstream and uploads what only the local store holds.
    cas: Arc<dyn BlobStore>,
    /// The proxy's read-through, to bring blobs into the local store.
    reads: Arc<ReadThrough>,
    /// The local store (to check what was brought in).
    local: Arc<dyn BlobStore>,
    /// Until when the asset endpoint is believed to answer UNIMPLEMENTED.
    unimplemented_until: Mutex<Option<Instant>>,
    /// The upload queue (write-back mode): a Push is forwarded only after
    /// its content left it.
    uploads: Option<Arc<UploadQueue>>,
}

impl AssetUpstream {
    /// Asset calls go to `client`; content moves through the proxy's `cas`
    /// and `reads` into and out of `local`.
    pub fn new(
        client: Upstream,
        cas: Arc<dyn BlobStore>,
        reads: Arc<ReadThrough>,
        local: Arc<dyn BlobStore>,
    ) -> Self {
        AssetUpstream {
            client,
            cas,
            reads,
            local,
            unimplemented_until: Mutex::new(None),
            uploads: None,
        }
    }

    /// Pushes wait for `queue` to upload their content (write-back mode).
    pub fn with_upload_queue(mut self, queue: Option<Arc<UploadQueue>>) -> Self {
        self.uploads = queue;
        self
    }

    /// Whether the asset endpoint is worth asking (not known to lack the API).
    pub fn available(&self) -> bool {
        let until = self
            .unimplemented_until
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        until.is_none_or(|t| Instant::now() >= t)
    }

    /// Remembers that the asset endpoint lacks the API, saying so once.
    fn remember_unimplemented(&self) {
        let mut until = self
            .unimplemented_until
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if until.is_none_or(|t| Instant::now() >= t) {
            tracing::info!(
                "upstream {} does not serve Remote Asset (UNIMPLEMENTED); serving assets locally, asking again in {} minutes",
                self.client.config().uri,
                UNIMPLEMENTED_RETRY.as_secs() / 60
            );
        }
        *until = Some(Instant::now() + UNIMPLEMENTED_RETRY);
    }

    /// Runs one asset call; `None` when the endpoint lacks the API (now or
    /// remembered).
    async fn call<T, F, Fut>(
        &self,
        ctx: &RequestContext,
        method: UpstreamMethod,
        call: F,
    ) -> Result<Option<T>>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        if !self.available() {
            return Ok(None);
        }
        match self.client.unary(ctx, method, call).await {
            Ok(answer) => Ok(Some(answer)),
            Err(Error::Unimplemented(_)) => {
                self.remember_unimplemented();
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Forwards a FetchBlob (instance mapped, qualifiers as the client sent
    /// them); the call may last `timeout` (the upstream may download).
    pub async fn fetch_blob(
        &self,
        ctx: &RequestContext,
        request: &AssetRequest,
        timeout: Duration,
    ) -> Result<Option<FetchBlobResponse>> {
        let message = FetchBlobRequest {
            instance_name: self.client.instance(ctx),
            timeout: request.timeout.map(proto_duration),
            oldest_content_accepted: oldest(request),
            uris: request.uris.clone(),
            qualifiers: request.forwarded_qualifiers(),
            digest_function: request.digest_function.to_proto(),
        };
        self.call(ctx, UpstreamMethod::FetchBlob, || {
            let mut call = self.client.request(ctx, message.clone());
            call.set_timeout(timeout);
            let mut client = self.client.asset_fetch();
            async move { client.fetch_blob(call).await }
        })
        .await
    }

    /// Forwards a FetchDirectory, like [`AssetUpstream::fetch_blob`].
    pub async fn fetch_directory(
        &self,
        ctx: &RequestContext,
        request: &AssetRequest,
        timeout: Duration,
    ) -> Result<Option<FetchDirectoryResponse>> {
        let message = FetchDirectoryRequest {
            instance_name: self.client.instance(ctx),
            timeout: request.timeout.map(proto_duration),
            oldest_content_accepted: oldest(request),
            uris: request.uris.clone(),
            qualifiers: request.forwarded_qualifiers(),
            digest_function: request.digest_function.to_proto(),
        };
        self.call(ctx, UpstreamMethod::FetchDirectory, || {
            let mut call = self.client.request(ctx, message.clone());
            call.set_timeout(timeout);
            let mut client = self.client.asset_fetch();
            async move { client.fetch_directory(call).await }
        })
        .await
    }

    /// Forwards a Push; `false` when the endpoint lacks the API. The caller
    /// has made sure the upstream CAS holds the content ([`AssetUpstream::upload`]).
    pub async fn push(
        &self,
        ctx: &RequestContext,
        request: &AssetRequest,
        pushed: &PushedContent,
    ) -> Result<bool> {
        let instance_name = self.client.instance(ctx);
        let protos = |digests: &[Digest]| digests.iter().map(Digest::to_proto).collect::<Vec<_>>();
        let answered = match pushed.kind {
            AssetKind::Blob => {
                let message = PushBlobRequest {
                    instance_name,
                    uris: request.uris.clone(),
                    qualifiers: request.forwarded_qualifiers(),
                    expire_at: timestamp(pushed.expire_at),
                    blob_digest: Some(pushed.root.to_proto()),
                    references_blobs: protos(&pushed.references_blobs),
                    references_directories: protos(&pushed.references_directories),
                    digest_function: request.digest_function.to_proto(),
                };
                self.call(ctx, UpstreamMethod::PushBlob, || {
                    let call = self.client.unary_request(ctx, message.clone());
                    let mut client = self.client.asset_push();
                    async move { client.push_blob(call).await }
                })
                .await?
                .is_some()
            }
            AssetKind::Directory => {
                let message = PushDirectoryRequest {
                    instance_name,
                    uris: request.uris.clone(),
                    qualifiers: request.forwarded_qualifiers(),
                    expire_at: timestamp(pushed.expire_at),
                    root_directory_digest: Some(pushed.root.to_proto()),
                    references_blobs: protos(&pushed.references_blobs),
                    references_directories: protos(&pushed.references_directories),
                    digest_function: request.digest_function.to_proto(),
                };
                self.call(ctx, UpstreamMethod::PushDirectory, || {
                    let call = self.client.unary_request(ctx, message.clone());
                    let mut client = self.client.asset_push();
                    async move { client.push_directory(call).await }
                })
                .await?
                .is_some()
            }
        };
        Ok(answered)
    }

    /// Brings `content` into the local store from wherever the proxy CAS
    /// finds it (local first, then the upstream CAS); returns the blobs
    /// that are nowhere (or could not be brought in).
    pub async fn pull(&self, ctx: &RequestContext, content: &Content) -> Result<Vec<Digest>> {
        // Walking the trees through the proxy reads their Directories in.
        let blobs = content.blobs(&*self.cas, ctx).await?;
        for (digest, result) in self.reads.bring_in(ctx, &blobs, |_| {}).await? {
            if let Err(e) = result {
                tracing::debug!("asset content {digest} could not be brought in: {e}");
            }
        }
        self.local.find_missing(ctx, &blobs).await
    }

    /// Makes sure the upstream CAS holds every blob of `content`, uploading
    /// from the local store what it lacks.
    pub async fn upload(&self, ctx: &RequestContext, content: &Content) -> Result<()> {
        let blobs = content.blobs(&*self.local, ctx).await?;
        // The proxy answers for the upstream, after uploading what only the
        // local store holds.
        let missing = self.cas.find_missing(ctx, &blobs).await?;
        if missing.is_empty() {
            // Present may mean queued: the Push waits until it is up.
            if let Some(queue) = self.uploads.as_ref().filter(|q| !q.is_empty()) {
                queue.flush(ctx, &blobs).await?;
            }
            return Ok(());
        }
        Err(Error::Unavailable(format!(
            "could not upload {} blobs of the pushed content to the upstream (first: {})",
            missing.len(),
            missing[0]
        )))
    }
}

fn proto_duration(d: Duration) -> bazel_remote_apis::google::protobuf::Duration {
    bazel_remote_apis::google::protobuf::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

fn oldest(request: &AssetRequest) -> Option<Timestamp> {
    request
        .oldest_content_accepted
        .map(|seconds| Timestamp { seconds, nanos: 0 })
}
