//! GetCapabilities: what this server offers, for any instance name.

use bazel_remote_apis::build::bazel::remote::execution::v2::{
    ActionCacheUpdateCapabilities, CacheCapabilities, ExecutionCapabilities,
    GetCapabilitiesRequest, ServerCapabilities, capabilities_server::Capabilities,
    symlink_absolute_path_strategy,
};
use bazel_remote_apis::build::bazel::semver::SemVer;
use tonic::{Request, Response, Status};

use crate::digest::DigestFunction;

/// Lowest REAPI version served: 2.0, so that Bazel 4.x connects.
pub const LOW_API_VERSION: (i32, i32) = (2, 0);
/// Highest REAPI version whose cache features are implemented: digest
/// functions in requests (2.1), `output_paths`-era results and
/// `root_directory_digest` completeness checks (2.3).
pub const HIGH_API_VERSION: (i32, i32) = (2, 3);

/// Serves the cache capabilities of a standalone Outpost (execution disabled).
pub struct CapabilitiesService {
    max_batch_total_size_bytes: u64,
}

impl CapabilitiesService {
    /// Advertises `max_batch_total_size_bytes` to clients.
    pub fn new(max_batch_total_size_bytes: u64) -> Self {
        CapabilitiesService {
            max_batch_total_size_bytes,
        }
    }
}

fn semver((major, minor): (i32, i32)) -> SemVer {
    SemVer {
        major,
        minor,
        patch: 0,
        prerelease: String::new(),
    }
}

#[tonic::async_trait]
impl Capabilities for CapabilitiesService {
    async fn get_capabilities(
        &self,
        _request: Request<GetCapabilitiesRequest>,
    ) -> Result<Response<ServerCapabilities>, Status> {
        let sha256 = DigestFunction::Sha256.to_proto();
        Ok(Response::new(ServerCapabilities {
            cache_capabilities: Some(CacheCapabilities {
                digest_functions: vec![sha256],
                action_cache_update_capabilities: Some(ActionCacheUpdateCapabilities {
                    update_enabled: true,
                }),
                max_batch_total_size_bytes: self.max_batch_total_size_bytes as i64,
                symlink_absolute_path_strategy: symlink_absolute_path_strategy::Value::Allowed
                    as i32,
                supported_compressors: vec![],
                supported_batch_update_compressors: vec![],
                ..Default::default()
            }),
            execution_capabilities: Some(ExecutionCapabilities {
                digest_function: sha256,
                exec_enabled: false,
                digest_functions: vec![sha256],
                ..Default::default()
            }),
            deprecated_api_version: None,
            low_api_version: Some(semver(LOW_API_VERSION)),
            high_api_version: Some(semver(HIGH_API_VERSION)),
        }))
    }
}
