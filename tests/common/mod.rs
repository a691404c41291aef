//! Shared fixture: an in-process server on 127.0.0.1:0 over a temporary
//! store ([`TestServer`]), the real binary as a child process
//! ([`spawn_server`]), and the test kit's REAPI client helpers. Tests compute
//! digests with `sha2` themselves, so they do not trust the code under test.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use outpost::admin_proto::GetStatsResponse;
use outpost::config::Config;
use outpost::config::{UpstreamConfig, UpstreamSection};
use outpost::server::RunningServer;
use tonic::Code;
use tonic::transport::Channel;

pub use outpost::config::upstream::WriteMode;
pub use outpost_testkit::client::*;
pub use outpost_testkit::fake as fake_upstream;
use outpost_testkit::fake::{FakeUpstream, Method};
pub use outpost_testkit::{Rng, ServerProcess, blob, bs, digest, re, sha256_hex};

/// Outpost's Admin service (stats).
pub type Admin = outpost::admin_proto::admin_client::AdminClient<Channel>;

/// Upper bound for a metric the tests wait for (never reached when all is well).
const METRIC_WAIT: Duration = Duration::from_secs(10);

/// One of Outpost's metrics (as at `/metrics`).
pub async fn metric(server: &TestServer, name: &str) -> u64 {
    *stats(server)
        .await
        .metrics
        .get(name)
        .unwrap_or_else(|| panic!("no metric {name}"))
}

/// Polls metric `name` until it reaches at least `at_least`; returns its value.
pub async fn wait_metric(server: &TestServer, name: &str, at_least: u64) -> u64 {
    let deadline = Instant::now() + METRIC_WAIT;
    loop {
        let v = metric(server, name).await;
        if v >= at_least {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {name} >= {at_least} (is {v})"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Starts the `outpost` binary over `data_dir`, its stderr going to `log`.
pub fn spawn_server(data_dir: &Path, log: &Path) -> ServerProcess {
    ServerProcess::command(env!("CARGO_BIN_EXE_outpost"), data_dir)
        .log_file(log)
        .start()
        .expect("outpost starts")
}

/// The server counters and occupancy.
pub async fn stats(clients: &impl Clients) -> GetStatsResponse {
    Admin::new(clients.channel())
        .get_stats(outpost::admin_proto::GetStatsRequest {})
        .await
        .expect("GetStats")
        .into_inner()
}

/// An Outpost proxying `fake`, with its upstream settings and configuration
/// adjusted. Returns once the start-up capabilities probe has been answered,
/// so it never lands in a test's counts after `reset_stats`.
pub async fn start_proxy(
    fake: &FakeUpstream,
    adjust: impl FnOnce(&mut UpstreamConfig),
    adjust_config: impl FnOnce(&mut Config),
) -> TestServer {
    let mut upstream = UpstreamConfig::resolve(UpstreamSection::default(), Some(fake.url()))
        .expect("valid upstream settings")
        .expect("an upstream is configured");
    adjust(&mut upstream);
    let server = TestServer::start_with(|c| {
        c.upstream = Some(upstream);
        adjust_config(c);
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !fake
        .calls_of(Method::GetCapabilities)
        .iter()
        .any(|c| c.code.is_some())
    {
        assert!(
            Instant::now() < deadline,
            "the proxy never asked the upstream for its capabilities"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    server
}

/// A real server running inside the test process over a temporary store.
pub struct TestServer {
    server: RunningServer,
    /// The configuration it runs with (and restarts with).
    config: Config,
    /// Owns the data directory; deleted when the test ends.
    dir: tempfile::TempDir,
    channel: Channel,
}

impl Clients for TestServer {
    fn channel(&self) -> Channel {
        self.channel.clone()
    }
}

impl TestServer {
    /// A server with [`Config::for_tests`].
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// A server with [`Config::for_tests`] adjusted by `adjust`.
    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = Config::for_tests(&dir.path().join("data"));
        adjust(&mut config);
        Self::start_in(dir, config).await
    }

    async fn start_in(dir: tempfile::TempDir, config: Config) -> Self {
        let server = RunningServer::start(&config).await.expect("server starts");
        let channel = outpost::client::connect(&format!("grpc://{}", server.addr))
            .await
            .expect("client connects");
        TestServer {
            server,
            config,
            dir,
            channel,
        }
    }

    /// The TCP address it serves on (for clients with their own connection).
    pub fn addr(&self) -> SocketAddr {
        self.server.addr
    }

    /// The metrics listener's address, when `metrics_listen` is set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.server.metrics_addr
    }

    /// The store's directory.
    pub fn data_dir(&self) -> &Path {
        &self.config.data_dir
    }

    /// Stops gracefully and starts again over the same store.
    pub async fn restart(self) -> Self {
        let TestServer {
            server,
            config,
            dir,
            channel,
        } = self;
        drop(channel);
        server.stop().await.expect("server stops cleanly");
        Self::start_in(dir, config).await
    }

    /// Stops gracefully.
    pub async fn stop(self) {
        drop(self.channel);
        self.server.stop().await.expect("server stops cleanly");
    }

    /// Asserts that the store holds nothing: no blob, no action result, no
    /// upload debris in `tmp/`, no blob file.
    pub async fn assert_nothing_stored(&self) {
        let s = stats(self).await;
        assert_eq!(
            (
                s.blob_count,
                s.blob_bytes,
                s.action_result_count,
                s.blobs_written
            ),
            (0, 0, 0, 0),
            "the store must stay empty"
        );
        assert_eq!(
            list_files(&self.data_dir().join("tmp")),
            Vec::<PathBuf>::new()
        );
        assert_eq!(
            list_files(&self.data_dir().join("blobs")),
            Vec::<PathBuf>::new()
        );
    }

    /// Asserts that the server still answers: a blob goes in and comes back.
    pub async fn assert_still_serves(&self) {
        let data = blob(0x5e11e5, 1000);
        let d = digest(&data);
        assert_eq!(
            batch_update(&mut self.cas(), "", &[&data]).await,
            vec![Code::Ok]
        );
        let (read, _) = read_blob(&mut self.bytestream(), &read_name("", &d), 0, 0)
            .await
            .expect("read after bad input");
        assert_eq!(read, data);
    }
}

/// Every regular file under `dir`, recursively, sorted (empty if `dir` is absent).
pub fn list_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                pending.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}
