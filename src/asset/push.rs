//! PushBlob and PushDirectory: the content must be in the CAS (locally, or
//! upstream in proxy mode, then brought in); with an upstream asset service
//! the upstream CAS is completed and the Push forwarded first (a failed
//! forward fails the Push); then one entry per URI is recorded locally.

use std::sync::Arc;

use bazel_remote_apis::google::protobuf::Any;
use prost::Message;
use tonic::Code;

use crate::asset::local::{LocalAssets, new_record, record};
use crate::asset::request::{AssetRequest, now_secs};
use crate::asset::upstream::{AssetUpstream, PushedContent};
use crate::context::RequestContext;
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::reapi::action::{PreconditionFailure, Violation};
use crate::stats::Stats;
use crate::store::asset_index::AssetSource;

/// Answers PushBlob and PushDirectory.
pub struct Pusher {
    local: Arc<dyn LocalAssets>,
    upstream: Option<Arc<AssetUpstream>>,
    stats: Arc<Stats>,
}

impl Pusher {
    /// Records pushes in `local`, forwarding them to `upstream` when given.
    pub fn new(
        local: Arc<dyn LocalAssets>,
        upstream: Option<Arc<AssetUpstream>>,
        stats: Arc<Stats>,
    ) -> Self {
        Pusher {
            local,
            upstream,
            stats,
        }
    }

    /// Accepts a Push of `pushed` under every URI of `request`.
    pub async fn push(
        &self,
        ctx: &RequestContext,
        request: &AssetRequest,
        pushed: &PushedContent,
    ) -> Result<()> {
        let content = pushed.content();
        let missing = match &self.upstream {
            Some(upstream) => upstream.pull(ctx, &content).await?,
            None => content.missing(&*self.local, ctx).await?,
        };
        if !missing.is_empty() {
            return Err(missing_content(&missing));
        }
        if let Some(upstream) = &self.upstream
            && upstream.available()
        {
            upstream.upload(ctx, &content).await?;
            upstream.push(ctx, request, pushed).await?;
        }
        let now = now_secs();
        for uri in &request.uris {
            let mut entry = new_record(
                request,
                uri,
                pushed.kind,
                AssetSource::Push,
                pushed.root,
                now,
                pushed.expire_at,
            );
            entry.references_blobs = pushed
                .references_blobs
                .iter()
                .map(Digest::to_proto)
                .collect();
            entry.references_directories = pushed
                .references_directories
                .iter()
                .map(Digest::to_proto)
                .collect();
            record(&*self.local, request, &entry).await?;
        }
        Stats::add(&self.stats.asset_pushes, 1);
        Ok(())
    }
}

/// FAILED_PRECONDITION naming each missing blob in a PreconditionFailure
/// MISSING violation (the REAPI convention).
fn missing_content(missing: &[Digest]) -> Error {
    let failure = PreconditionFailure {
        violations: missing
            .iter()
            .map(|d| Violation {
                r#type: "MISSING".into(),
                subject: format!("blobs/{}/{}", d.hash_hex(), d.size),
                description: String::new(),
            })
            .collect(),
    };
    Error::with_details(
        Code::FailedPrecondition,
        format!(
            "{} blobs the push names are not in the CAS (first: {}); upload them first",
            missing.len(),
            missing[0]
        ),
        vec![Any {
            type_url: "type.googleapis.com/google.rpc.PreconditionFailure".into(),
            value: failure.encode_to_vec(),
        }],
    )
}
