//! Call-rate load for the per-call cost benches (`auth_cost`,
//! `observe_cost`): many concurrent callers repeating one request.

use std::time::{Duration, Instant};

use bazel_remote_apis::build::bazel::remote::execution::v2::FindMissingBlobsRequest;
use bazel_remote_apis::build::bazel::remote::execution::v2::content_addressable_storage_client::ContentAddressableStorageClient;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// FindMissingBlobs calls per second, summed over `clients` concurrent
/// callers (clones of `cas`, so one channel) repeating `request` until
/// `duration` has passed. The interceptor adds what each bench's calls
/// carry (a credential, a `RequestMetadata` header).
pub async fn find_missing_rate<F>(
    cas: &ContentAddressableStorageClient<InterceptedService<Channel, F>>,
    request: &FindMissingBlobsRequest,
    clients: usize,
    duration: Duration,
) -> Result<f64, tonic::Status>
where
    F: Interceptor + Clone + Send + 'static,
{
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let mut cas = cas.clone();
        let request = request.clone();
        tasks.push(tokio::spawn(async move {
            let start = Instant::now();
            let mut calls = 0u64;
            while Instant::now() < deadline {
                cas.find_missing_blobs(request.clone()).await?;
                calls += 1;
            }
            Ok::<_, tonic::Status>((calls, start.elapsed()))
        }));
    }
    let mut rate = 0.0;
    for task in tasks {
        let (calls, elapsed) = task
            .await
            .map_err(|e| tonic::Status::internal(format!("a caller panicked: {e}")))??;
        rate += calls as f64 / elapsed.as_secs_f64();
    }
    Ok(rate)
}
