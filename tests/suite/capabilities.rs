//! GetCapabilities.

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capabilities_advertise_a_sha256_cache_without_execution_for_any_instance() {
    let server = TestServer::start_with(|c| c.max_batch_total_size_bytes = 3 << 20).await;
    for instance in ["", "main", "a/b/c", "with-dash_and.dot/x"] {
        let caps = server
            .capabilities()
            .get_capabilities(re::GetCapabilitiesRequest {
                instance_name: instance.to_string(),
            })
            .await
            .unwrap_or_else(|e| panic!("instance {instance:?}: {e}"))
            .into_inner();
        let sha256 = re::digest_function::Value::Sha256 as i32;

        let cache = caps.cache_capabilities.expect("cache capabilities");
        let every_function: Vec<i32> = outpost_testkit::digests::FUNCTIONS
            .map(|f| f as i32)
            .to_vec();
        assert_eq!(cache.digest_functions, every_function);
        assert_eq!(cache.max_batch_total_size_bytes, 3 << 20);
        assert!(
            cache
                .action_cache_update_capabilities
                .expect("AC caps")
                .update_enabled
        );
        let zstd = re::compressor::Value::Zstd as i32;
        assert_eq!(cache.supported_compressors, vec![zstd]);
        assert_eq!(cache.supported_batch_update_compressors, vec![zstd]);

        let exec = caps.execution_capabilities.expect("execution capabilities");
        assert!(!exec.exec_enabled);
        assert_eq!(exec.digest_function, sha256);
        assert_eq!(exec.digest_functions, every_function);

        let low = caps.low_api_version.expect("low_api_version");
        let high = caps.high_api_version.expect("high_api_version");
        assert_eq!((low.major, low.minor, low.patch), (2, 0, 0));
        assert_eq!((high.major, high.minor, high.patch), (2, 3, 0));
        assert!(caps.deprecated_api_version.is_none());
    }
    server.stop().await;
}
