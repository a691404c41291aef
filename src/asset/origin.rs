//! Downloads Remote Asset content from its http(s) origin into the CAS:
//! each mirror in turn, streamed to the store's writer, verified against
//! every `checksum.sri`, bounded in size and time, only from allowed hosts.

use std::sync::Arc;
use std::time::Duration;

use crate::asset::sri::Sri;
use crate::config::AssetConfig;
use crate::context::RequestContext;
use crate::digest::{Digest, DigestFunction};
use crate::error::Result;
use crate::stats::Stats;
use crate::store::BlobStore;

/// One origin download, built from a FetchBlob request.
#[derive(Clone, Debug)]
pub struct OriginRequest {
    /// The mirrors, tried in order; non-http(s) ones are skipped.
    pub uris: Vec<String>,
    /// Request headers for each URI (same order as `uris`). They carry
    /// credentials: never logged, never stored.
    pub headers: Vec<Vec<(String, String)>>,
    /// Content must match one of these (empty: no check).
    pub checksums: Vec<Sri>,
    /// Bound on the whole download.
    pub timeout: Duration,
    /// The digest function the blob is stored under.
    pub digest_function: DigestFunction,
}

/// How an origin download ended, when the failure is the origin's (it goes
/// inline in the FetchBlobResponse's `status`).
#[derive(Debug)]
pub enum OriginOutcome {
    /// Stored and verified.
    Fetched {
        /// The URI that worked.
        uri: String,
        /// The stored blob.
        digest: Digest,
    },
    /// Every mirror failed; this is the last failure.
    Failed {
        /// The URI the failure came from.
        uri: String,
        /// NOT_FOUND, PERMISSION_DENIED, DEADLINE_EXCEEDED, ABORTED
        /// (checksum mismatch) or RESOURCE_EXHAUSTED (over `max_size`).
        code: tonic::Code,
        /// What happened, without credentials.
        message: String,
    },
}

/// Downloads origin content into a store.
pub struct OriginFetcher {
    _private: (),
}

impl OriginFetcher {
    /// A fetcher writing into `store` (the local store).
    pub fn new(
        config: AssetConfig,
        store: Arc<dyn BlobStore>,
        stats: Arc<Stats>,
    ) -> anyhow::Result<Self> {
        let _ = (config, store, stats);
        todo!("issue 8: origin.rs")
    }

    /// Whether Outpost can download `uri` (http or https).
    pub fn handles(uri: &str) -> bool {
        let _ = uri;
        todo!("issue 8: origin.rs")
    }

    /// Downloads the first mirror that works. `Err` only for Outpost's own
    /// failures (store full, disk errors); the origin's go in the outcome.
    pub async fn fetch(
        &self,
        ctx: &RequestContext,
        request: &OriginRequest,
    ) -> Result<OriginOutcome> {
        let _ = (ctx, request);
        todo!("issue 8: origin.rs")
    }
}
