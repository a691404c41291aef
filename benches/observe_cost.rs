//! The cost of the observer layer (`outpost::status::observe`, which wraps
//! every call and its response body to record the status code, the caller
//! and the errors): the same services served with and without
//! `ObserveLayer`, side by side in one run, each variant's figure and the
//! ratio with / without.
//!
//! Each variant gets its own in-process server: tonic's `Server::builder()`
//! with the HTTP/2 windows and frame size of `outpost::server`, TCP_NODELAY,
//! `CasService` and `ByteStreamService` over a standalone `LocalStore` in a
//! temporary directory, and (observed) `ObserveLayer` as its only layer, so
//! the difference between the two is the layer alone. The clients share one
//! 2-thread runtime with the servers, so the figure is the whole machine's
//! cost. Every call carries a `RequestMetadata` header as Bazel sends it
//! (the observer decodes it to name the caller).
//!
//! Two workloads, the variants taking turns in short rounds (the order
//! rotating every round), each reporting its median round (on a shared
//! machine, load that comes and goes then hits both alike):
//! - unary: FindMissingBlobs calls/s over N concurrent clients on one
//!   channel, each call asking about 10 digests, half of them stored (as
//!   `benches/auth_cost.rs`);
//! - streaming: ByteStream Read MB/s of one random blob (256 MiB), one read
//!   per variant per round; the observer wraps the response body, so every
//!   64 KiB message passes through it.
//!
//! Run: `cargo bench --bench observe_cost`
//! Knobs: `OUTPOST_BENCH_CLIENTS` (default 16), `OUTPOST_BENCH_ROUNDS`
//! (default 7), `OUTPOST_BENCH_SECONDS` per round (default 1),
//! `OUTPOST_BENCH_READS` (read rounds, default 7), `OUTPOST_BENCH_SIZE_MIB`
//! (default 256).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::ensure;
use bazel_remote_apis::build::bazel::remote::execution::v2::{
    self as re, BatchUpdateBlobsRequest, FindMissingBlobsRequest, batch_update_blobs_request,
    content_addressable_storage_client::ContentAddressableStorageClient,
    content_addressable_storage_server::ContentAddressableStorageServer,
};
use bazel_remote_apis::google::bytestream::{
    ReadRequest, byte_stream_client::ByteStreamClient, byte_stream_server::ByteStreamServer,
};
use outpost::config::defaults;
use outpost::context::REQUEST_METADATA_HEADER;
use outpost::server::{CONNECTION_WINDOW, MAX_FRAME, STREAM_WINDOW};
use outpost::service::Backend;
use outpost::service::bytestream::ByteStreamService;
use outpost::service::cas::CasService;
use outpost::stack::Stack;
use outpost::stats::Stats;
use outpost::status::observe::{ObserveLayer, Observer};
use outpost::store::local::{LocalStore, LocalStoreOptions};
use outpost_testkit::client::{read_name, write_name, write_stream};
use outpost_testkit::env::env_usize;
use outpost_testkit::load::find_missing_rate;
use outpost_testkit::{blob, digest};
use prost::Message as _;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::metadata::BinaryMetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Server};

/// Calls before measuring (connections, the store's caches).
const WARMUP_CALLS: usize = 20;
/// Size of the ByteStream Write messages that store the large blob.
const WRITE_CHUNK: usize = 1 << 20;

/// The two variants: name, and whether `ObserveLayer` is on.
const VARIANTS: [(&str, bool); 2] = [("without observer", false), ("with ObserveLayer", true)];

fn main() -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let clients = env_usize("OUTPOST_BENCH_CLIENTS", 16)?.max(1);
    let rounds = env_usize("OUTPOST_BENCH_ROUNDS", 7)?.max(1);
    let seconds = env_usize("OUTPOST_BENCH_SECONDS", 1)?.max(1) as u64;
    let reads = env_usize("OUTPOST_BENCH_READS", 7)?.max(1);
    let size_mib = env_usize("OUTPOST_BENCH_SIZE_MIB", 256)?.max(1);
    let dir = tempfile::tempdir()?;
    let large = Arc::new(blob(1, size_mib << 20));
    let mut setups = Vec::new();
    for (name, observed) in VARIANTS {
        setups.push(Setup::start(name, observed, dir.path(), &large).await?);
    }
    drop(large);

    println!(
        "FindMissingBlobs (10 digests, 5 stored) calls/s, {clients} concurrent clients; \
         median of {rounds} rounds of {seconds} s, variants taking turns"
    );
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); setups.len()];
    for round in 0..rounds {
        for i in turns(round, setups.len()) {
            rates[i].push(
                setups[i]
                    .round(clients, Duration::from_secs(seconds))
                    .await?,
            );
        }
    }
    let calls = report(&setups, rates, "calls/s");
    println!(
        "  per call: {:.1} µs without, {:.1} µs with ({:+.1} µs)",
        1e6 / calls[0],
        1e6 / calls[1],
        1e6 / calls[1] - 1e6 / calls[0]
    );

    println!(
        "ByteStream Read of a {size_mib} MiB blob (64 KiB messages), MB/s; \
         median of {reads} reads each, variants taking turns"
    );
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); setups.len()];
    for round in 0..reads {
        for i in turns(round, setups.len()) {
            rates[i].push(setups[i].read().await?);
        }
    }
    report(&setups, rates, "MB/s");

    for setup in setups {
        setup.stop().await?;
    }
    Ok(())
}

/// The order in which `n` variants take their turns in `round`: rotated
/// every round, so that none always runs right after another (with a fixed
/// order, the second of two identical variants measured 1.5% and 6% slower
/// than the first in two runs on the 2-core build box).
fn turns(round: usize, n: usize) -> impl Iterator<Item = usize> {
    (0..n).map(move |k| (round + k) % n)
}

/// Prints each variant's median (and its rounds' range) and the ratio with /
/// without; returns the medians.
fn report(setups: &[Setup], rates: Vec<Vec<f64>>, unit: &str) -> Vec<f64> {
    let mut medians = Vec::new();
    for (setup, mut rates) in setups.iter().zip(rates) {
        rates.sort_by(f64::total_cmp);
        let median = rates[rates.len() / 2];
        println!(
            "  {:<18} {:>9.0} {unit}  (rounds {:.0}..{:.0})",
            setup.name,
            median,
            rates[0],
            rates[rates.len() - 1]
        );
        medians.push(median);
    }
    println!("  with / without: {:.3}x", medians[1] / medians[0]);
    medians
}

/// Adds the `RequestMetadata` header Bazel sends to every call.
#[derive(Clone)]
struct AsBazel(BinaryMetadataValue);

impl AsBazel {
    fn new() -> Self {
        let metadata = re::RequestMetadata {
            tool_details: Some(re::ToolDetails {
                tool_name: "bazel".into(),
                tool_version: "7.4.0".into(),
            }),
            tool_invocation_id: "3f0c2a8e-0000-4000-8000-0000000000b1".into(),
            correlated_invocations_id: "3f0c2a8e-0000-4000-8000-0000000000b2".into(),
            ..Default::default()
        };
        AsBazel(BinaryMetadataValue::from_bytes(&metadata.encode_to_vec()))
    }
}

impl tonic::service::Interceptor for AsBazel {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert_bin(REQUEST_METADATA_HEADER, self.0.clone());
        Ok(request)
    }
}

/// A channel whose calls carry the Bazel header.
type Calls = InterceptedService<Channel, AsBazel>;

/// A running server of one variant, its clients and what they ask for.
struct Setup {
    name: &'static str,
    cas: ContentAddressableStorageClient<Calls>,
    bytestream: ByteStreamClient<Calls>,
    /// The FindMissingBlobs request the unary rounds repeat.
    request: FindMissingBlobsRequest,
    /// The large blob the read rounds read.
    large: re::Digest,
    shutdown: CancellationToken,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
    local: LocalStore,
    /// Owns the store's directory.
    _data: tempfile::TempDir,
}

impl Setup {
    /// Serves a fresh store, stores the small blobs and `large`, and warms up.
    async fn start(
        name: &'static str,
        observed: bool,
        dir: &Path,
        large: &Arc<Vec<u8>>,
    ) -> anyhow::Result<Self> {
        let data = tempfile::tempdir_in(dir)?;
        let stats = Arc::new(Stats::default());
        let options = LocalStoreOptions {
            dir: data.path().to_path_buf(),
            quota_bytes: defaults::QUOTA,
            inline_limit: defaults::INLINE_LIMIT,
            sync: defaults::FSYNC,
        };
        let local = {
            let stats = stats.clone();
            tokio::task::spawn_blocking(move || LocalStore::open(options, stats))
                .await??
                .with_compression(defaults::STORE_COMPRESSION)
        };
        // As `outpost::server` builds it without an upstream.
        let stack = Stack::standalone(&local, &stats);
        let backend = Backend {
            blobs: stack.blobs,
            actions: stack.results,
            stats: stats.clone(),
            max_batch_total_size_bytes: defaults::MAX_BATCH,
        };
        let cas = ContentAddressableStorageServer::new(CasService::new(backend.clone()));
        let bytestream = ByteStreamServer::new(ByteStreamService::new(backend));

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        let shutdown = CancellationToken::new();
        let stopped = shutdown.clone().cancelled_owned();
        let mut builder = Server::builder()
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME);
        let server = if observed {
            let layer = ObserveLayer::new(Arc::new(Observer::new(stats)));
            let router = builder
                .layer(layer)
                .add_service(cas)
                .add_service(bytestream);
            tokio::spawn(router.serve_with_incoming_shutdown(incoming, stopped))
        } else {
            let router = builder.add_service(cas).add_service(bytestream);
            tokio::spawn(router.serve_with_incoming_shutdown(incoming, stopped))
        };

        let channel = outpost::client::connect(&format!("grpc://{addr}")).await?;
        let mut cas =
            ContentAddressableStorageClient::with_interceptor(channel.clone(), AsBazel::new());
        let mut bytestream = ByteStreamClient::with_interceptor(channel, AsBazel::new());

        let blobs: Vec<Vec<u8>> = (0..10).map(|i| blob(i, 100)).collect();
        // Half of the digests asked about are stored (by the same client).
        let upload = BatchUpdateBlobsRequest {
            requests: blobs[..5]
                .iter()
                .map(|b| batch_update_blobs_request::Request {
                    digest: Some(digest(b)),
                    data: b.clone(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let stored = cas.batch_update_blobs(upload).await?.into_inner();
        ensure!(
            stored
                .responses
                .iter()
                .all(|r| r.status.as_ref().is_none_or(|s| s.code == 0))
        );
        let request = FindMissingBlobsRequest {
            blob_digests: blobs.iter().map(|b| digest(b)).collect(),
            ..Default::default()
        };
        for _ in 0..WARMUP_CALLS {
            cas.find_missing_blobs(request.clone()).await?;
        }

        let large_digest = digest(large);
        let requests = write_stream(write_name("", &large_digest), large.clone(), WRITE_CHUNK);
        let written = bytestream.write(requests).await?.into_inner();
        ensure!(written.committed_size == large_digest.size_bytes);
        let setup = Setup {
            name,
            cas,
            bytestream,
            request,
            large: large_digest,
            shutdown,
            server,
            local,
            _data: data,
        };
        // One read to warm up (the page cache, the connection's windows).
        setup.read().await?;
        Ok(setup)
    }

    /// Calls per second over `clients` concurrent callers for `duration`.
    async fn round(&self, clients: usize, duration: Duration) -> anyhow::Result<f64> {
        Ok(find_missing_rate(&self.cas, &self.request, clients, duration).await?)
    }

    /// Reads the large blob once; MB/s (10^6 bytes).
    async fn read(&self) -> anyhow::Result<f64> {
        let mut bytestream = self.bytestream.clone();
        let start = Instant::now();
        let mut stream = bytestream
            .read(ReadRequest {
                resource_name: read_name("", &self.large),
                read_offset: 0,
                read_limit: 0,
            })
            .await?
            .into_inner();
        let mut total = 0u64;
        while let Some(response) = stream.message().await? {
            total += response.data.len() as u64;
        }
        let secs = start.elapsed().as_secs_f64();
        ensure!(
            total == self.large.size_bytes as u64,
            "Read returned {total} of {} bytes",
            self.large.size_bytes
        );
        Ok(total as f64 / secs / 1e6)
    }

    /// Closes the clients, stops the server and flushes the store.
    async fn stop(self) -> anyhow::Result<()> {
        let Setup {
            cas,
            bytestream,
            shutdown,
            server,
            local,
            _data,
            ..
        } = self;
        drop((cas, bytestream));
        shutdown.cancel();
        server.await??;
        local.close_cleanly()?;
        Ok(())
    }
}
