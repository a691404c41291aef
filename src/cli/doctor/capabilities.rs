//! What the upstream's capabilities mean for Outpost, one check each: API
//! versions (they must overlap 2.0-2.3), digest functions (SHA-256),
//! compressors against `[upstream] compression`, batch limit, execution.

use bazel_remote_apis::build::bazel::remote::execution::v2::{
    ServerCapabilities, compressor, digest_function,
};

use crate::cli::human_bytes;
use crate::config::UpstreamConfig;
use crate::config::upstream::UpstreamCompression;
use crate::service::capabilities::{HIGH_API_VERSION, LOW_API_VERSION};

use super::Check;

/// What the capabilities mean for Outpost: API versions, digest functions,
/// compressors, batch limit, execution.
pub fn judge(caps: &ServerCapabilities, config: &UpstreamConfig) -> Vec<Check> {
    let mut checks = vec![api_versions(caps)];
    let cache = caps.cache_capabilities.clone().unwrap_or_default();
    let functions: Vec<&str> = cache
        .digest_functions
        .iter()
        .map(|&f| digest_function::Value::try_from(f).map_or("UNKNOWN", |v| v.as_str_name()))
        .collect();
    let sha256 = digest_function::Value::Sha256 as i32;
    checks.push(if cache.digest_functions.contains(&sha256) {
        Check::ok("digests", functions.join(", "))
    } else if cache.digest_functions.is_empty() {
        Check::warn(
            "digests",
            "none advertised (old servers mean SHA-256)",
            "if cache calls fail with INVALID_ARGUMENT, the upstream hashes differently",
        )
    } else {
        Check::fail(
            "digests",
            format!("{} (no SHA-256)", functions.join(", ")),
            "Outpost and Bazel hash with SHA-256 by default: use an upstream that accepts it",
        )
    });
    let zstd = compressor::Value::Zstd as i32;
    let names: Vec<&str> = cache
        .supported_compressors
        .iter()
        .map(|&c| compressor::Value::try_from(c).map_or("UNKNOWN", |v| v.as_str_name()))
        .collect();
    checks.push(
        match (
            cache.supported_compressors.contains(&zstd),
            config.compression,
        ) {
            (true, UpstreamCompression::Auto) => Check::ok(
                "compression",
                format!("{}: blobs cross the WAN zstd-compressed", names.join(", ")),
            ),
            (true, UpstreamCompression::Off) => Check::ok(
                "compression",
                format!(
                    "{} offered, but [upstream] compression = \"off\": blobs cross plain",
                    names.join(", ")
                ),
            ),
            (false, _) => Check::ok("compression", "none offered: blobs cross the WAN plain"),
        },
    );
    let batch = cache.max_batch_total_size_bytes;
    checks.push(Check::ok(
        "batch limit",
        if batch > 0 {
            format!("{} per batch call", human_bytes(batch as u64))
        } else {
            "none advertised (Outpost keeps batches under 4 MiB)".to_string()
        },
    ));
    let exec = caps
        .execution_capabilities
        .as_ref()
        .is_some_and(|e| e.exec_enabled);
    checks.push(Check::ok(
        "execution",
        if exec {
            "enabled: clients may use --remote_executor through Outpost"
        } else {
            "disabled: a cache only"
        },
    ));
    checks
}

/// The upstream's API range must overlap Outpost's (2.0 to 2.3).
fn api_versions(caps: &ServerCapabilities) -> Check {
    let ours = format!(
        "{}.{}-{}.{}",
        LOW_API_VERSION.0, LOW_API_VERSION.1, HIGH_API_VERSION.0, HIGH_API_VERSION.1
    );
    let (Some(low), Some(high)) = (&caps.low_api_version, &caps.high_api_version) else {
        return Check::warn(
            "api versions",
            "not advertised (a server older than REAPI 2.0?)",
            format!("Outpost speaks {ours}: expect calls to fail if the upstream is older"),
        );
    };
    let (low, high) = ((low.major, low.minor), (high.major, high.minor));
    let text = format!(
        "{}.{}-{}.{} (Outpost: {ours})",
        low.0, low.1, high.0, high.1
    );
    if low <= HIGH_API_VERSION && high >= LOW_API_VERSION {
        Check::ok("api versions", text)
    } else {
        Check::fail(
            "api versions",
            format!("{text}: no version in common"),
            "use an upstream that speaks REAPI 2.0 to 2.3",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::doctor::Verdict;
    use bazel_remote_apis::build::bazel::remote::execution::v2::{
        CacheCapabilities, ExecutionCapabilities,
    };
    use bazel_remote_apis::build::bazel::semver::SemVer;

    fn config() -> UpstreamConfig {
        UpstreamConfig::resolve(
            Default::default(),
            Some("grpcs://cache.example.com:443".into()),
        )
        .unwrap()
        .unwrap()
    }

    fn caps(low: (i32, i32), high: (i32, i32), functions: Vec<i32>) -> ServerCapabilities {
        let v = |(major, minor)| {
            Some(SemVer {
                major,
                minor,
                ..Default::default()
            })
        };
        ServerCapabilities {
            cache_capabilities: Some(CacheCapabilities {
                digest_functions: functions,
                max_batch_total_size_bytes: 4 << 20,
                supported_compressors: vec![compressor::Value::Zstd as i32],
                ..Default::default()
            }),
            execution_capabilities: Some(ExecutionCapabilities {
                exec_enabled: true,
                ..Default::default()
            }),
            low_api_version: v(low),
            high_api_version: v(high),
            ..Default::default()
        }
    }

    fn find<'a>(checks: &'a [Check], name: &str) -> &'a Check {
        checks.iter().find(|c| c.name == name).unwrap()
    }

    #[test]
    fn a_compatible_upstream_is_all_ok() {
        let sha = digest_function::Value::Sha256 as i32;
        let checks = judge(&caps((2, 0), (2, 3), vec![sha]), &config());
        assert!(
            checks.iter().all(|c| c.verdict == Verdict::Ok),
            "{checks:?}"
        );
        assert_eq!(
            find(&checks, "api versions").finding,
            "2.0-2.3 (Outpost: 2.0-2.3)"
        );
        assert_eq!(find(&checks, "digests").finding, "SHA256");
        assert!(find(&checks, "compression").finding.starts_with("ZSTD: "));
        assert_eq!(
            find(&checks, "batch limit").finding,
            "4.0 MiB per batch call"
        );
        assert!(find(&checks, "execution").finding.starts_with("enabled"));
    }

    #[test]
    fn no_common_version_or_no_sha256_fails() {
        let sha = digest_function::Value::Sha256 as i32;
        let blake3 = digest_function::Value::Blake3 as i32;
        let checks = judge(&caps((3, 0), (3, 1), vec![sha]), &config());
        assert_eq!(find(&checks, "api versions").verdict, Verdict::Fail);
        let checks = judge(&caps((2, 0), (2, 3), vec![blake3]), &config());
        let digests = find(&checks, "digests");
        assert_eq!(digests.verdict, Verdict::Fail);
        assert_eq!(digests.finding, "BLAKE3 (no SHA-256)");
    }
}
