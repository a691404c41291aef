//! Assembles the store stack and the services, and serves them on TCP (TLS
//! when configured) and a unix socket until told to shut down.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bazel_remote_apis::build::bazel::remote::asset::v1::{
    fetch_server::FetchServer, push_server::PushServer,
};
use bazel_remote_apis::build::bazel::remote::execution::v2::{
    action_cache_server::ActionCacheServer, capabilities_server::CapabilitiesServer,
    content_addressable_storage_server::ContentAddressableStorageServer,
    execution_server::ExecutionServer,
};
use bazel_remote_apis::build::bazel::remote::logstream::v1::log_stream_service_server::LogStreamServiceServer;
use bazel_remote_apis::google::bytestream::byte_stream_server::ByteStreamServer;
use bazel_remote_apis::google::longrunning::operations_server::OperationsServer;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic::transport::server::Router;

use crate::admin_proto::admin_server::AdminServer;
use crate::asset::fetch::{Fetcher, Origin};
use crate::asset::local::LocalAssets;
use crate::asset::origin::OriginFetcher;
use crate::asset::push::Pusher;
use crate::config::Config;
use crate::listen::{bind_unix, serve_tcp};
use crate::service::Backend;
use crate::service::action_cache::ActionCacheService;
use crate::service::admin::AdminService;
use crate::service::asset::AssetService;
use crate::service::bytestream::ByteStreamService;
use crate::service::capabilities::CapabilitiesService;
use crate::service::cas::CasService;
use crate::service::execution::ExecutionService;
use crate::service::logstream::LogStreamService;
use crate::service::operations::OperationsService;
use crate::service::parked::{ParkedLimits, ParkedUploads};
use crate::stack::Stack;
use crate::stats::Stats;
use crate::store::BlobStore;
use crate::store::complete::CompleteActionResults;
use crate::store::local::{LocalStore, LocalStoreOptions};
use crate::store::write_back::UploadQueue;
use crate::tasks::Background;
use crate::tls::ReloadingTls;

/// HTTP/2 flow-control window of one stream. tonic's defaults cap uploads
/// at ~0.1 GB/s on loopback; this, [`CONNECTION_WINDOW`] and [`MAX_FRAME`]
/// were measured to give >1 GB/s both ways (see docs/architecture.md).
/// Public so that benches serving their own routes use the same settings.
pub const STREAM_WINDOW: u32 = 16 << 20;
/// HTTP/2 flow-control window of one connection (see [`STREAM_WINDOW`]).
pub const CONNECTION_WINDOW: u32 = 32 << 20;
/// Largest HTTP/2 frame the server sends (see [`STREAM_WINDOW`]).
pub const MAX_FRAME: u32 = 1 << 20;
/// How long shutdown waits for in-flight calls before it stops waiting.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for background work (prefetch, batchers, relays)
/// after the listeners are closed, before it flushes the store anyway.
const BACKGROUND_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// The layers around every listener's routes, from the outside in: the
/// observer (`crate::status::observe`), `decode_status`, authentication
/// (`crate::auth`), then per-client limits (`crate::limits`, keyed by the
/// authenticated credential).
pub(crate) type DecodeLayers = tower::layer::util::Stack<
    crate::limits::LimitLayer,
    tower::layer::util::Stack<
        crate::auth::AuthLayer,
        tower::layer::util::Stack<
            tower::util::MapResponseLayer<crate::decode_status::Rewrite>,
            tower::layer::util::Stack<
                crate::status::observe::ObserveLayer,
                tower::layer::util::Identity,
            >,
        >,
    >,
>;

/// The shared service objects; each listener gets a router over the same ones.
#[derive(Clone)]
struct Services {
    capabilities: Arc<CapabilitiesService>,
    cas: Arc<CasService>,
    bytestream: Arc<ByteStreamService>,
    action_cache: Arc<ActionCacheService>,
    /// Remote Asset Fetch and Push.
    asset: Arc<AssetService>,
    /// Execution and Operations passthrough (proxy mode only).
    execution: Option<Arc<ExecutionService>>,
    operations: Option<Arc<OperationsService>>,
    /// Remote Logstream (UNIMPLEMENTED without an upstream).
    logstream: Arc<LogStreamService>,
    admin: Arc<AdminService>,
    /// Who may call what: checked on every call before any service runs.
    auth: Arc<crate::auth::Authenticator>,
    /// Per-client call slots, shared by every listener.
    limits: crate::limits::LimitLayer,
    /// Decoding limit for Batch* requests: the batch limit plus framing room.
    max_message: usize,
    /// Records every call's outcome for the status report and metrics.
    observe: crate::status::observe::ObserveLayer,
}

impl Services {
    fn router(&self) -> Router<DecodeLayers> {
        let max = self.max_message;
        Server::builder()
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            // One span per RPC, carrying the client's invocation ids.
            .trace_fn(crate::context::rpc_span)
            // Every call's code, method and caller (refusals too).
            .layer(self.observe.clone())
            // A request that does not decode: INVALID_ARGUMENT, not INTERNAL.
            .layer(crate::decode_status::layer())
            // Credentials and roles, before anything else runs.
            .layer(crate::auth::AuthLayer::new(self.auth.clone()))
            // Per-client call slots (inside authentication: keyed by credential).
            .layer(self.limits.clone())
            .add_service(CapabilitiesServer::from_arc(self.capabilities.clone()))
            .add_service(
                ContentAddressableStorageServer::from_arc(self.cas.clone())
                    .max_decoding_message_size(max)
                    .max_encoding_message_size(max),
            )
            .add_service(
                ByteStreamServer::from_arc(self.bytestream.clone())
                    .max_decoding_message_size(max)
                    .max_encoding_message_size(max),
            )
            .add_service(
                ActionCacheServer::from_arc(self.action_cache.clone())
                    .max_decoding_message_size(max)
                    .max_encoding_message_size(max),
            )
            .add_service(
                FetchServer::from_arc(self.asset.clone())
                    .max_decoding_message_size(max)
                    .max_encoding_message_size(max),
            )
            .add_service(
                PushServer::from_arc(self.asset.clone())
                    .max_decoding_message_size(max)
                    .max_encoding_message_size(max),
            )
            .add_service(AdminServer::from_arc(self.admin.clone()))
            .add_optional_service(self.execution.clone().map(|e| {
                ExecutionServer::from_arc(e)
                    .max_decoding_message_size(max)
                    .max_encoding_message_size(max)
            }))
            .add_optional_service(self.operations.clone().map(OperationsServer::from_arc))
            .add_service(LogStreamServiceServer::from_arc(self.logstream.clone()))
    }
}

/// A server started in the background (used by `main` and by tests).
pub struct RunningServer {
    /// The TCP address actually bound (useful with port 0).
    pub addr: SocketAddr,
    /// The metrics address actually bound, when metrics are served.
    pub metrics_addr: Option<SocketAddr>,
    /// The unix socket served on, if any (for the ready file).
    unix_socket: Option<PathBuf>,
    shutdown: CancellationToken,
    tasks: JoinSet<anyhow::Result<()>>,
    /// Work spawned outside requests; drained before the store is flushed.
    background: Background,
    local: LocalStore,
    /// The upload queue (write-back mode) and how long a stop uploads it.
    uploads: Option<(Arc<UploadQueue>, Duration)>,
}

impl RunningServer {
    /// Opens the store and starts serving on the configured listeners.
    pub async fn start(config: &Config) -> anyhow::Result<Self> {
        let stats = Arc::new(Stats::default());
        let options = LocalStoreOptions {
            dir: config.data_dir.clone(),
            quota_bytes: config.quota_bytes,
            inline_limit: config.inline_limit,
            sync: config.fsync,
        };
        let local = {
            let stats = stats.clone();
            tokio::task::spawn_blocking(move || LocalStore::open(options, stats))
                .await?
                .map(|store| store.with_compression(config.store_compression))
                .with_context(|| {
                    format!("cannot open the store in {}", config.data_dir.display())
                })?
        };
        let background = Background::new();
        let stack = match &config.upstream {
            None => Stack::standalone(&local, &stats),
            Some(_) => Stack::proxy(config, &local, &stats, &background)?,
        };
        let Stack {
            blobs,
            results,
            upstream,
            execution,
            operations,
            asset_upstream,
            passthrough,
            inputs,
            uploads,
        } = stack;
        let uploads = uploads.map(|queue| {
            let upstream = config
                .upstream
                .as_ref()
                .expect("write-back needs an upstream");
            (queue, upstream.write_back_drain_timeout)
        });
        let local_blobs: Arc<dyn BlobStore> = Arc::new(local.clone());
        let actions = Arc::new(
            CompleteActionResults::new(results, blobs.clone(), stats.clone())
                .with_fallback(local_blobs),
        );
        let backend = Backend {
            blobs,
            actions,
            stats: stats.clone(),
            max_batch_total_size_bytes: config.max_batch_total_size_bytes,
        };
        let asset = Arc::new(asset_service(
            config,
            &local,
            asset_upstream,
            &stats,
            &background,
        )?);
        // Interrupted uploads: the first thing to go when the store needs room.
        let parked = Arc::new(ParkedUploads::new(
            ParkedLimits::for_quota(config.quota_bytes),
            stats.clone(),
        ));
        local.set_reclaimer(parked.reclaimer());
        let observer = Arc::new(crate::status::observe::Observer::new(stats.clone()));
        let status = Arc::new(
            crate::status::StatusSource::new(config, stats.clone(), local.clone())
                .with_observer(observer.clone())
                .with_upstream(upstream.clone()),
        );
        background.spawn(status.clone().sample());
        let services = Services {
            capabilities: Arc::new(CapabilitiesService::new(
                config.max_batch_total_size_bytes,
                upstream,
            )),
            cas: Arc::new(CasService::new(backend.clone()).with_inputs(inputs)),
            bytestream: Arc::new(
                ByteStreamService::new(backend.clone())
                    .with_passthrough(passthrough.clone())
                    .with_parked(parked),
            ),
            action_cache: Arc::new(ActionCacheService::new(backend)),
            asset,
            execution,
            operations,
            logstream: Arc::new(LogStreamService::new(passthrough)),
            admin: Arc::new(AdminService::new(
                local.clone(),
                stats.clone(),
                config.upstream.as_ref().map(|u| u.uri.clone()),
            )),
            auth: Arc::new(crate::auth::Authenticator::new(
                &config.auth,
                stats.clone(),
            )?),
            limits: crate::limits::LimitLayer::new(Arc::new(crate::limits::ClientLimits::new(
                &config.limits,
                stats.clone(),
            ))),
            max_message: config.max_batch_total_size_bytes as usize + (1 << 20),
            observe: crate::status::observe::ObserveLayer::new(observer),
        };

        let shutdown = background.closing_token();
        services.auth.watch(shutdown.clone());
        let tls = match &config.tls {
            None => None,
            Some(files) => {
                let tls = ReloadingTls::load(files).context("cannot use [server] TLS files")?;
                tls.watch(stats.clone(), shutdown.clone());
                Some(tls)
            }
        };
        let mut tasks = JoinSet::new();
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let addr = listener.local_addr()?;
        serve_tcp(
            &mut tasks,
            listener,
            services.router(),
            tls.clone(),
            &stats,
            &shutdown,
        )?;

        let mut metrics_addr = None;
        if let Some(addr) = config.metrics_listen {
            let listener = crate::metrics::bind(addr).await?;
            metrics_addr = Some(listener.local_addr()?);
            let (stats, local) = (stats.clone(), local.clone());
            tasks.spawn(crate::metrics::serve(
                listener,
                tls.clone(),
                stats,
                local,
                status.clone(),
                shutdown.clone(),
            ));
        }

        tasks.spawn(refresh_running_marker(local.clone(), shutdown.clone()));

        if let Some(path) = &config.unix_socket {
            let incoming = bind_unix(path)?;
            let router = services.router();
            let token = shutdown.clone();
            let path = path.clone();
            tasks.spawn(async move {
                let result = router
                    .serve_with_incoming_shutdown(incoming, token.cancelled_owned())
                    .await
                    .context("unix socket server failed");
                let _ = std::fs::remove_file(&path);
                result
            });
            tracing::info!(
                "serving REAPI on unix://{}",
                config.unix_socket.as_ref().expect("set").display()
            );
        }
        Ok(RunningServer {
            addr,
            metrics_addr,
            unix_socket: config.unix_socket.clone(),
            shutdown,
            tasks,
            background,
            local,
            uploads,
        })
    }

    /// Writes the bound addresses to `path` (`grpc=ADDR`, then `metrics=ADDR`
    /// and `unix=PATH` when served), atomically: a temporary file renamed into
    /// place. It exists so that a parent process can start the server on port
    /// 0 and learn where it listens without racing for a free port.
    pub fn write_ready_file(&self, path: &Path) -> anyhow::Result<()> {
        let mut text = format!("grpc={}\n", self.addr);
        if let Some(addr) = self.metrics_addr {
            text += &format!("metrics={addr}\n");
        }
        if let Some(socket) = &self.unix_socket {
            text += &format!("unix={}\n", socket.display());
        }
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".tmp.{}", std::process::id()));
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, path))
            .with_context(|| format!("cannot write the ready file {}", path.display()))
    }

    /// Stops accepting calls, lets in-flight ones finish (bounded), uploads
    /// the write-back queue (bounded), cancels and drains background work
    /// (bounded), and flushes the store.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
            while let Some(result) = self.tasks.join_next().await {
                result??;
            }
            anyhow::Ok(())
        })
        .await;
        match drained {
            Ok(result) => result?,
            Err(_) => {
                tracing::warn!(
                    "calls or connections still open after {DRAIN_TIMEOUT:?}; stopping anyway"
                )
            }
        }
        if let Some((queue, within)) = &self.uploads {
            drain_uploads(queue, *within).await;
        }
        let running = self.background.shutdown(BACKGROUND_DRAIN_TIMEOUT).await;
        if running > 0 {
            tracing::warn!(
                "{running} background tasks still running after {BACKGROUND_DRAIN_TIMEOUT:?}; flushing anyway"
            );
        }
        self.local.close_cleanly()?;
        Ok(())
    }

    /// Serves until `signal` completes, then stops gracefully.
    pub async fn run_until(mut self, signal: impl Future<Output = ()>) -> anyhow::Result<()> {
        tokio::select! {
            _ = signal => tracing::info!("shutting down"),
            Some(result) = self.tasks.join_next() => {
                // A listener died on its own: report it after stopping the rest.
                let err = match result {
                    Ok(Ok(())) => anyhow::anyhow!("a listener stopped unexpectedly"),
                    Ok(Err(e)) => e,
                    Err(e) => e.into(),
                };
                let _ = self.stop().await;
                return Err(err);
            }
        }
        self.stop().await
    }
}

/// Uploads the write-back queue for at most `within` at a graceful stop,
/// and says what is left for the next start.
async fn drain_uploads(queue: &UploadQueue, within: Duration) {
    let waiting = queue.state();
    if waiting.is_empty() {
        return;
    }
    tracing::info!(
        blobs = waiting.blobs,
        bytes = waiting.bytes,
        results = waiting.results,
        "uploading the write-back queue before stopping (at most {within:?})"
    );
    let left = queue.drain(within).await;
    if left.is_empty() {
        tracing::info!("write-back queue uploaded");
    } else {
        tracing::warn!(
            blobs = left.blobs,
            bytes = left.bytes,
            results = left.results,
            "write-back queue not empty after {within:?}: the rest is uploaded after the next start"
        );
    }
}

/// Refreshes the store's running marker until shutdown, so that after an
/// unclean stop the next start knows which files were written last.
async fn refresh_running_marker(
    local: LocalStore,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(crate::store::local::RUNNING_MARKER_REFRESH);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {
                if let Err(e) = local.refresh_running_marker() {
                    tracing::warn!("cannot refresh the running marker: {e}");
                }
            }
        }
    }
}

/// The Remote Asset service over the local store, with the upstream's asset
/// endpoint (proxy mode) and origin downloads (when `[asset] origin_fetch`).
fn asset_service(
    config: &Config,
    local: &LocalStore,
    upstream: Option<Arc<crate::asset::upstream::AssetUpstream>>,
    stats: &Arc<Stats>,
    background: &Background,
) -> anyhow::Result<AssetService> {
    let assets: Arc<dyn LocalAssets> = Arc::new(local.clone());
    let origin = if config.asset.origin_fetch {
        // Downloads are spooled beside the store, outside its own tmp/.
        let fetcher = OriginFetcher::new(
            config.asset.clone(),
            Arc::new(local.clone()),
            stats.clone(),
            config.data_dir.join("asset-spool"),
        )?;
        tracing::info!("Remote Asset fetches may download from origin URLs");
        Some(Origin {
            fetcher: Arc::new(fetcher),
            timeout: config.asset.origin_timeout,
        })
    } else {
        None
    };
    let fetcher = Fetcher::new(
        assets.clone(),
        upstream.clone(),
        origin,
        stats.clone(),
        background,
    );
    let pusher = Pusher::new(assets, upstream, stats.clone());
    Ok(AssetService::new(Arc::new(fetcher), Arc::new(pusher)))
}
