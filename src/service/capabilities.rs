//! GetCapabilities: what this server offers, for any instance name.
//!
//! Standalone, Outpost answers with its own cache capabilities and execution
//! disabled. In front of an upstream it answers with the intersection: never
//! a digest function or feature the upstream lacks, its own batch limit only
//! where it is smaller than the upstream's, and execution exactly as the
//! upstream offers it (Execute is forwarded). Compressors are Outpost's own
//! (it decodes and encodes zstd itself, whatever the upstream speaks).

use std::sync::Arc;

use bazel_remote_apis::build::bazel::remote::execution::v2::{
    ActionCacheUpdateCapabilities, CacheCapabilities, ExecutionCapabilities,
    GetCapabilitiesRequest, ServerCapabilities, capabilities_server::Capabilities,
    symlink_absolute_path_strategy,
};
use bazel_remote_apis::build::bazel::semver::SemVer;
use tonic::{Request, Response, Status};

use crate::compression::Compressor;
use crate::context::RequestContext;
use crate::digest::DigestFunction;
use crate::upstream::Upstream;

/// Lowest REAPI version served: 2.0, so that Bazel 4.x connects.
pub const LOW_API_VERSION: (i32, i32) = (2, 0);
/// Highest REAPI version whose cache features are implemented: digest
/// functions in requests (2.1), `output_paths`-era results and
/// `root_directory_digest` completeness checks (2.3).
pub const HIGH_API_VERSION: (i32, i32) = (2, 3);

/// Serves the capabilities of this Outpost.
pub struct CapabilitiesService {
    max_batch_total_size_bytes: u64,
    upstream: Option<Arc<Upstream>>,
}

impl CapabilitiesService {
    /// Advertises `max_batch_total_size_bytes`, narrowed by the upstream's
    /// capabilities when there is an upstream.
    pub fn new(max_batch_total_size_bytes: u64, upstream: Option<Arc<Upstream>>) -> Self {
        CapabilitiesService {
            max_batch_total_size_bytes,
            upstream,
        }
    }

    /// Outpost's own capabilities.
    fn own(&self) -> ServerCapabilities {
        let sha256 = DigestFunction::Sha256.to_proto();
        let every_function: Vec<i32> = DigestFunction::ALL.map(DigestFunction::to_proto).into();
        ServerCapabilities {
            cache_capabilities: Some(CacheCapabilities {
                digest_functions: every_function.clone(),
                action_cache_update_capabilities: Some(ActionCacheUpdateCapabilities {
                    update_enabled: true,
                }),
                max_batch_total_size_bytes: self.max_batch_total_size_bytes as i64,
                symlink_absolute_path_strategy: symlink_absolute_path_strategy::Value::Allowed
                    as i32,
                supported_compressors: compressors(),
                supported_batch_update_compressors: compressors(),
                ..Default::default()
            }),
            execution_capabilities: Some(ExecutionCapabilities {
                digest_function: sha256,
                exec_enabled: false,
                digest_functions: every_function,
                ..Default::default()
            }),
            deprecated_api_version: None,
            low_api_version: Some(semver(LOW_API_VERSION)),
            high_api_version: Some(semver(HIGH_API_VERSION)),
        }
    }
}

/// The compressors of `compressed-blobs` names and batch entries: Outpost
/// encodes and decodes them itself, so they are offered whatever the
/// upstream speaks (it is told only what it advertises).
fn compressors() -> Vec<i32> {
    Compressor::ALL.iter().map(|c| c.to_proto()).collect()
}

fn semver((major, minor): (i32, i32)) -> SemVer {
    SemVer {
        major,
        minor,
        patch: 0,
        prerelease: String::new(),
    }
}

/// Narrows our capabilities to what the upstream also offers.
pub fn merge(mut own: ServerCapabilities, upstream: &ServerCapabilities) -> ServerCapabilities {
    if let (Some(ours), Some(theirs)) = (&mut own.cache_capabilities, &upstream.cache_capabilities)
    {
        // Servers from before REAPI 2.1 list no digest functions: SHA-256.
        let theirs_fns = if theirs.digest_functions.is_empty() {
            vec![DigestFunction::Sha256.to_proto()]
        } else {
            theirs.digest_functions.clone()
        };
        ours.digest_functions.retain(|f| theirs_fns.contains(f));
        if theirs.max_batch_total_size_bytes > 0 {
            ours.max_batch_total_size_bytes = ours
                .max_batch_total_size_bytes
                .min(theirs.max_batch_total_size_bytes);
        }
        ours.action_cache_update_capabilities = Some(ActionCacheUpdateCapabilities {
            update_enabled: theirs
                .action_cache_update_capabilities
                .as_ref()
                .is_some_and(|c| c.update_enabled),
        });
        ours.symlink_absolute_path_strategy = theirs.symlink_absolute_path_strategy;
        if theirs.max_cas_blob_size_bytes > 0 {
            ours.max_cas_blob_size_bytes = theirs.max_cas_blob_size_bytes;
        }
    }
    // Execution is forwarded, so it is offered exactly as the upstream does.
    if let Some(theirs) = &upstream.execution_capabilities {
        let mut exec = theirs.clone();
        let ours = DigestFunction::ALL.map(DigestFunction::to_proto);
        exec.digest_functions.retain(|f| ours.contains(f));
        own.execution_capabilities = Some(exec);
    }
    if let Some(high) = &upstream.high_api_version {
        let ours = own
            .high_api_version
            .as_ref()
            .map_or((0, 0), |v| (v.major, v.minor));
        if (high.major, high.minor) < ours && (high.major, high.minor) >= LOW_API_VERSION {
            own.high_api_version = Some(semver((high.major, high.minor)));
        }
    }
    own
}

#[tonic::async_trait]
impl Capabilities for CapabilitiesService {
    async fn get_capabilities(
        &self,
        request: Request<GetCapabilitiesRequest>,
    ) -> Result<Response<ServerCapabilities>, Status> {
        let own = self.own();
        let Some(upstream) = &self.upstream else {
            return Ok(Response::new(own));
        };
        let (metadata, _, req) = request.into_parts();
        let ctx = RequestContext::from_metadata(req.instance_name, &metadata);
        match upstream.capabilities(&ctx).await {
            Ok(theirs) => Ok(Response::new(merge(own, &theirs))),
            Err(e) => {
                // Clients refuse to start on an error here; our own cache-only
                // answer is safe (SHA-256, zstd served by Outpost itself,
                // no execution).
                tracing::warn!("cannot get the upstream's capabilities: {e}");
                Ok(Response::new(own))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_never_advertises_more_than_the_upstream() {
        let ours = CapabilitiesService::new(4 << 20, None).own();
        let mut theirs = ours.clone();
        let cache = theirs.cache_capabilities.as_mut().unwrap();
        cache.digest_functions = vec![9, 4]; // BLAKE3 and VSO
        cache.max_batch_total_size_bytes = 1 << 20;
        cache.action_cache_update_capabilities = None;
        theirs.high_api_version = Some(semver((2, 1)));
        let merged = merge(ours, &theirs);
        let cache = merged.cache_capabilities.unwrap();
        assert_eq!(cache.digest_functions, vec![9], "VSO is not ours");
        assert_eq!(cache.max_batch_total_size_bytes, 1 << 20);
        assert!(
            !cache
                .action_cache_update_capabilities
                .unwrap()
                .update_enabled
        );
        assert_eq!(merged.high_api_version.unwrap().minor, 1);
        assert!(!merged.execution_capabilities.unwrap().exec_enabled);
    }

    #[test]
    fn every_digest_function_is_advertised_standalone() {
        let own = CapabilitiesService::new(4 << 20, None).own();
        let all: Vec<i32> = DigestFunction::ALL.map(DigestFunction::to_proto).into();
        assert_eq!(own.cache_capabilities.unwrap().digest_functions, all);
        let exec = own.execution_capabilities.unwrap();
        assert_eq!(exec.digest_functions, all);
        assert_eq!(exec.digest_function, DigestFunction::Sha256.to_proto());
        // An upstream from before REAPI 2.1 lists none: SHA-256 only.
        let ours = CapabilitiesService::new(4 << 20, None).own();
        let mut theirs = ours.clone();
        theirs.cache_capabilities.as_mut().unwrap().digest_functions = vec![];
        let merged = merge(ours, &theirs);
        assert_eq!(merged.cache_capabilities.unwrap().digest_functions, vec![1]);
    }

    #[test]
    fn zstd_is_offered_even_when_the_upstream_has_no_compressor() {
        let ours = CapabilitiesService::new(4 << 20, None).own();
        let mut theirs = ours.clone();
        let cache = theirs.cache_capabilities.as_mut().unwrap();
        cache.supported_compressors.clear();
        cache.supported_batch_update_compressors.clear();
        let zstd = Compressor::Zstd.to_proto();
        let merged = merge(ours, &theirs).cache_capabilities.unwrap();
        assert_eq!(merged.supported_compressors, vec![zstd]);
        assert_eq!(merged.supported_batch_update_compressors, vec![zstd]);
    }
}
