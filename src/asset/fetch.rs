//! FetchBlob and FetchDirectory: the local index first, then (blobs) a CAS
//! blob with the requested checksum, then the upstream's asset service, then
//! (blobs) the origin. Everything past the local store runs as one shared
//! flight per identical request, spawned so that it goes on after the
//! client's deadline and the client's retry finds the result.

use std::sync::Arc;
use std::time::Duration;

use tonic::Code;

use crate::asset::content::Content;
use crate::asset::local::{LocalAssets, lookup, new_record, record};
use crate::asset::origin::{OriginFetcher, OriginOutcome, OriginRequest};
use crate::asset::request::{AssetRequest, now_secs, timestamp_secs};
use crate::asset::upstream::AssetUpstream;
use crate::context::RequestContext;
use crate::digest::{Digest, DigestFunction};
use crate::error::Result;
use crate::stats::Stats;
use crate::store::asset_index::{AssetKind, AssetRecord, AssetSource};
use crate::store::single_flight::SingleFlight;
use crate::tasks::Background;

/// Where a found asset came from (for the counters).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// The local index or CAS.
    Local,
    /// The upstream's asset service.
    Upstream,
    /// A download from the origin.
    Origin,
}

/// How a Fetch ends when Outpost itself did not fail.
#[derive(Clone, Debug)]
pub enum FetchOutcome {
    /// Found: the entry answering it (its URI, qualifiers, expiry, digest).
    Found {
        /// The entry (stored, or made up for a checksum hit).
        record: AssetRecord,
        /// Where it came from.
        via: Via,
    },
    /// Not served: the inline status of the answer.
    Failed {
        /// The URI the failure is about.
        uri: String,
        /// NOT_FOUND, or the origin's failure.
        code: Code,
        /// Why, without credentials.
        message: String,
    },
}

/// Origin downloads, when enabled.
pub struct Origin {
    /// The downloader.
    pub fetcher: Arc<OriginFetcher>,
    /// Bound on a download when the request gives no `timeout`.
    pub timeout: Duration,
}

/// Where Fetch looks past the local index.
struct Sources {
    local: Arc<dyn LocalAssets>,
    upstream: Option<Arc<AssetUpstream>>,
    origin: Option<Origin>,
}

/// Answers FetchBlob and FetchDirectory.
pub struct Fetcher {
    sources: Arc<Sources>,
    /// Remote fetches in progress, by [`AssetRequest::flight_key`].
    flights: SingleFlight<[u8; 32], FetchOutcome>,
    stats: Arc<Stats>,
}

impl Fetcher {
    /// Fetches from `local`, then `upstream` and `origin` when given;
    /// remote fetches run on `background`.
    pub fn new(
        local: Arc<dyn LocalAssets>,
        upstream: Option<Arc<AssetUpstream>>,
        origin: Option<Origin>,
        stats: Arc<Stats>,
        background: &Background,
    ) -> Self {
        Fetcher {
            sources: Arc::new(Sources {
                local,
                upstream,
                origin,
            }),
            flights: SingleFlight::new(background.clone()),
            stats,
        }
    }

    /// Finds the `kind` asset `request` names. `Err` only for Outpost's own
    /// failures; a miss is an inline [`FetchOutcome::Failed`].
    pub async fn fetch(
        &self,
        ctx: &RequestContext,
        request: AssetRequest,
        kind: AssetKind,
    ) -> Result<FetchOutcome> {
        Stats::add(&self.stats.asset_fetches, 1);
        let outcome = self.find(ctx, request, kind).await?;
        let counter = match &outcome {
            FetchOutcome::Found {
                via: Via::Local, ..
            } => &self.stats.asset_fetch_hits,
            FetchOutcome::Found {
                via: Via::Upstream, ..
            } => &self.stats.asset_fetch_upstream_hits,
            FetchOutcome::Found {
                via: Via::Origin, ..
            } => &self.stats.asset_fetch_origin,
            FetchOutcome::Failed { .. } => &self.stats.asset_fetch_misses,
        };
        Stats::add(counter, 1);
        Ok(outcome)
    }

    async fn find(
        &self,
        ctx: &RequestContext,
        request: AssetRequest,
        kind: AssetKind,
    ) -> Result<FetchOutcome> {
        let local = &*self.sources.local;
        if let Some(record) = lookup(local, ctx, &request, kind).await? {
            return Ok(found(record, Via::Local));
        }
        if kind == AssetKind::Blob
            && let Some(record) = by_checksum(local, &request).await?
        {
            return Ok(found(record, Via::Local));
        }
        if !self.sources.has_remote(&request, kind) {
            return Ok(not_found(&request, "no entry in the cache"));
        }
        let (sources, ctx) = (self.sources.clone(), ctx.clone());
        self.flights
            .run(request.flight_key(kind), move || async move {
                sources.fetch_remote(&ctx, &request, kind).await
            })
            .await
    }
}

impl Sources {
    /// Whether anything past the local store could answer.
    fn has_remote(&self, request: &AssetRequest, kind: AssetKind) -> bool {
        self.upstream.as_ref().is_some_and(|u| u.available()) || self.origin_for(request, kind)
    }

    /// Whether the origin may be asked: a blob, qualifiers Outpost can
    /// honour, and some http(s) URI.
    fn origin_for(&self, request: &AssetRequest, kind: AssetKind) -> bool {
        self.origin.is_some()
            && kind == AssetKind::Blob
            && request.origin_can_honour()
            && request.uris.iter().any(|u| OriginFetcher::handles(u))
    }

    /// The flight: the local index again (a flight that just ended may have
    /// filled it), then the upstream, then the origin.
    async fn fetch_remote(
        &self,
        ctx: &RequestContext,
        request: &AssetRequest,
        kind: AssetKind,
    ) -> Result<FetchOutcome> {
        if let Some(record) = lookup(&*self.local, ctx, request, kind).await? {
            return Ok(found(record, Via::Local));
        }
        if let Some(upstream) = &self.upstream
            && let Some(record) = self.ask_upstream(upstream, ctx, request, kind).await?
        {
            return Ok(found(record, Via::Upstream));
        }
        if self.origin_for(request, kind)
            && let Some(origin) = &self.origin
        {
            return self.download(origin, ctx, request).await;
        }
        Ok(not_found(request, "not in the cache nor upstream"))
    }

    /// Asks the upstream's asset service; on an answer, pulls the content
    /// into the local store and records it. `None` when it has nothing (or
    /// failed: the origin may still have it).
    async fn ask_upstream(
        &self,
        upstream: &AssetUpstream,
        ctx: &RequestContext,
        request: &AssetRequest,
        kind: AssetKind,
    ) -> Result<Option<AssetRecord>> {
        let timeout = self.download_timeout(request);
        let answer = match kind {
            AssetKind::Blob => upstream.fetch_blob(ctx, request, timeout).await.map(|r| {
                r.map(|r| {
                    (
                        r.status,
                        r.uri,
                        r.expires_at,
                        r.blob_digest,
                        r.digest_function,
                    )
                })
            }),
            AssetKind::Directory => {
                upstream
                    .fetch_directory(ctx, request, timeout)
                    .await
                    .map(|r| {
                        r.map(|r| {
                            (
                                r.status,
                                r.uri,
                                r.expires_at,
                                r.root_directory_digest,
                                r.digest_function,
                            )
                        })
                    })
            }
        };
        let (status, uri, expires_at, digest, function) = match answer {
            Ok(Some(answer)) => answer,
            Ok(None) => return Ok(None),
            Err(e) => {
                tracing::warn!("upstream asset fetch failed: {e}");
                return Ok(None);
            }
        };
        if let Some(status) = status.filter(|s| s.code != Code::Ok as i32) {
            tracing::debug!(
                "upstream asset fetch answered {:?}",
                Code::from_i32(status.code)
            );
            return Ok(None);
        }
        let first = digest.as_ref().map(|d| d.hash.as_str());
        let root = match DigestFunction::for_request(function, first)
            .and_then(|f| Digest::from_proto(f, digest.as_ref()))
        {
            Ok(root) if root.function == request.digest_function => root,
            Ok(_) | Err(_) => {
                tracing::warn!("upstream asset fetch answered without a usable digest");
                return Ok(None);
            }
        };
        let content = Content {
            direct: vec![root],
            trees: if kind == AssetKind::Directory {
                vec![root]
            } else {
                Vec::new()
            },
        };
        let missing = upstream.pull(ctx, &content).await?;
        if !missing.is_empty() {
            tracing::warn!(
                "the upstream answered an asset fetch but {} of its blobs could not be brought in",
                missing.len()
            );
            return Ok(None);
        }
        let uri = if request.uris.contains(&uri) {
            uri
        } else {
            request.uris[0].clone()
        };
        let entry = new_record(
            request,
            &uri,
            kind,
            AssetSource::Upstream,
            root,
            now_secs(),
            timestamp_secs(expires_at.as_ref()),
        );
        record(&*self.local, request, &entry).await?;
        Ok(Some(entry))
    }

    /// Downloads from the origin and records what it stored.
    async fn download(
        &self,
        origin: &Origin,
        ctx: &RequestContext,
        request: &AssetRequest,
    ) -> Result<FetchOutcome> {
        let started = now_secs();
        let download = OriginRequest {
            uris: request.uris.clone(),
            headers: request.origin_headers(),
            checksums: request.checksums.clone(),
            timeout: self.download_timeout(request),
            digest_function: request.digest_function,
        };
        match origin.fetcher.fetch(ctx, &download).await? {
            OriginOutcome::Fetched { uri, digest } => {
                let entry = new_record(
                    request,
                    &uri,
                    AssetKind::Blob,
                    AssetSource::Origin,
                    digest,
                    started,
                    0,
                );
                record(&*self.local, request, &entry).await?;
                Ok(found(entry, Via::Origin))
            }
            OriginOutcome::Failed { uri, code, message } => {
                Ok(FetchOutcome::Failed { uri, code, message })
            }
        }
    }

    /// The request's `timeout`, else the configured origin timeout.
    fn download_timeout(&self, request: &AssetRequest) -> Duration {
        request.timeout.unwrap_or_else(|| {
            self.origin
                .as_ref()
                .map_or(DEFAULT_DOWNLOAD_TIMEOUT, |o| o.timeout)
        })
    }
}

/// Bound on an upstream fetch when neither the request nor `[asset]` gives one.
const DEFAULT_DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(600);

/// A CAS blob with one of the request's checksums (in its digest function,
/// e.g. `sha512-…` for a SHA-512 request) answers a
/// FetchBlob without asking anyone (nothing is recorded: the blob itself is
/// the proof).
async fn by_checksum(
    local: &dyn LocalAssets,
    request: &AssetRequest,
) -> Result<Option<AssetRecord>> {
    for hash in request.checksums_in_function() {
        // The local store marks the blob used when it finds it.
        if let Some(digest) = local.find_by_hash(request.digest_function, hash).await? {
            return Ok(Some(new_record(
                request,
                &request.uris[0],
                AssetKind::Blob,
                AssetSource::Origin,
                digest,
                now_secs(),
                0,
            )));
        }
    }
    Ok(None)
}

fn found(record: AssetRecord, via: Via) -> FetchOutcome {
    FetchOutcome::Found { record, via }
}

fn not_found(request: &AssetRequest, why: &str) -> FetchOutcome {
    FetchOutcome::Failed {
        uri: request.uris[0].clone(),
        code: Code::NotFound,
        message: format!("asset not found: {why}"),
    }
}
