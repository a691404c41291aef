//! The upstream connection: its two HTTP/2 channels ([`Channels`]: one for
//! clients' work, one with small flow-control windows for prefetch),
//! configured and forwarded headers, instance-name mapping, a limit on calls
//! in flight, retries with backoff on UNAVAILABLE, the upstream's
//! capabilities, and the [`Traffic`] count of client work in flight (taken
//! here, in the call policy, for every call made for a client).

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use bazel_remote_apis::build::bazel::remote::asset::v1::{
    fetch_client::FetchClient, push_client::PushClient,
};
use bazel_remote_apis::build::bazel::remote::execution::v2::{
    GetCapabilitiesRequest, ServerCapabilities, action_cache_client::ActionCacheClient,
    capabilities_client::CapabilitiesClient,
    content_addressable_storage_client::ContentAddressableStorageClient,
    execution_client::ExecutionClient,
};
use bazel_remote_apis::build::bazel::remote::logstream::v1::log_stream_service_client::LogStreamServiceClient;
use bazel_remote_apis::google::bytestream::byte_stream_client::ByteStreamClient;
use bazel_remote_apis::google::longrunning::operations_client::OperationsClient;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue};
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::config::UpstreamConfig;
use crate::context::{Priority, RequestContext};
use crate::error::{Error, Result, is_timeout};
use crate::stats::{Stats, UpstreamMethod};
use crate::upstream::channels::Channels;
use crate::upstream::health::Health;
use crate::upstream::link::{Link, measures_round_trip};
use crate::upstream::traffic::{ClientWork, Traffic};

/// Largest message accepted from the upstream.
const MAX_MESSAGE: usize = 64 << 20;
/// Capabilities are refreshed after this long.
const CAPABILITIES_TTL: Duration = Duration::from_secs(300);
/// First retry delay; doubles per attempt.
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(100);
/// Batch limit assumed while the upstream's capabilities are unknown.
const DEFAULT_UPSTREAM_BATCH: u64 = 4 << 20;
/// Room left in a batch for message framing and digests.
const BATCH_OVERHEAD: u64 = 64 << 10;

/// Whether a failed call may succeed if tried again: UNAVAILABLE, and the
/// `Unknown` / `Cancelled` that tonic reports when a connection breaks.
/// (A timeout is not: the call already waited its full deadline.)
pub fn is_transient(status: &Status) -> bool {
    if is_timeout(status) {
        return false;
    }
    match status.code() {
        Code::Unavailable => true,
        Code::Unknown | Code::Cancelled => {
            status.message().contains("transport error")
                || status.message().contains("connection")
                || status.message().contains("h2 protocol error")
        }
        _ => false,
    }
}

/// A connection to the upstream REAPI server.
pub struct Upstream {
    /// The resolved `[upstream]` settings.
    config: UpstreamConfig,
    /// The HTTP/2 channels for clients' work and for prefetch; they connect
    /// lazily and reconnect by themselves.
    channels: Channels,
    /// Client work in flight on the link, which prefetch yields to.
    traffic: Arc<Traffic>,
    /// Configured headers, parsed once (values marked sensitive: never logged).
    headers: Vec<(AsciiMetadataKey, AsciiMetadataValue)>,
    /// Bounds calls in flight.
    permits: Arc<Semaphore>,
    /// Fail-fast state.
    health: Health,
    /// The link's measured round-trip time and throughput.
    link: Link,
    /// Counters.
    stats: Arc<Stats>,
    /// Last capabilities answer and when it was fetched.
    capabilities: Mutex<Option<(Instant, ServerCapabilities)>>,
}

impl Upstream {
    /// Sets up the channels; does not connect until the first call. Client
    /// work is counted in a [`Traffic`] of its own (see
    /// [`Upstream::sharing_traffic`]).
    pub fn new(config: UpstreamConfig, stats: Arc<Stats>) -> anyhow::Result<Self> {
        let mut headers = Vec::new();
        for (name, value) in &config.headers {
            let key: AsciiMetadataKey = name
                .parse()
                .with_context(|| format!("invalid upstream header name {name:?}"))?;
            let mut value: AsciiMetadataValue = value
                .parse()
                .with_context(|| format!("invalid value for upstream header {name:?}"))?;
            value.set_sensitive(true);
            headers.push((key, value));
        }
        Ok(Upstream {
            channels: Channels::new(&config)?,
            traffic: Traffic::new(stats.clone()),
            permits: Arc::new(Semaphore::new(config.max_concurrent_calls)),
            health: Health::new(&config.uri),
            link: Link::default(),
            headers,
            stats,
            capabilities: Mutex::new(None),
            config,
        })
    }

    /// Counts client work in `traffic` instead (connections to other
    /// endpoints of the same upstream share the main one's, so prefetch
    /// yields to their clients too).
    pub fn sharing_traffic(mut self, traffic: Arc<Traffic>) -> Self {
        self.traffic = traffic;
        self
    }

    /// Client work in flight through this connection (prefetch waits for
    /// it to end).
    pub fn traffic(&self) -> &Arc<Traffic> {
        &self.traffic
    }

    /// The resolved settings.
    pub fn config(&self) -> &UpstreamConfig {
        &self.config
    }

    /// Counters shared with the rest of the server.
    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// The upstream instance name for this request.
    pub fn instance(&self, ctx: &RequestContext) -> String {
        self.config.map_instance(&ctx.instance).to_string()
    }

    /// Wraps a message with the forwarded and configured headers.
    pub fn request<T>(&self, ctx: &RequestContext, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if self.config.forward_client_headers {
            *request.metadata_mut() = ctx.headers.clone();
        }
        for (key, value) in &self.headers {
            request.metadata_mut().insert(key.clone(), value.clone());
        }
        request
    }

    /// Like [`Upstream::request`], with the unary deadline.
    pub fn unary_request<T>(&self, ctx: &RequestContext, message: T) -> Request<T> {
        let mut request = self.request(ctx, message);
        request.set_timeout(self.config.rpc_timeout);
        request
    }

    /// The channel for `ctx`'s work: prefetch has its own.
    fn channel_for(&self, ctx: &RequestContext) -> Channel {
        self.channels.for_priority(ctx.priority)
    }

    /// The channel for clients' work.
    fn channel(&self) -> Channel {
        self.channels.for_priority(Priority::Client)
    }

    /// A CAS client on the channel for `ctx`'s priority.
    pub fn cas(&self, ctx: &RequestContext) -> ContentAddressableStorageClient<Channel> {
        ContentAddressableStorageClient::new(self.channel_for(ctx))
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }

    /// A ByteStream client on the channel for `ctx`'s priority.
    pub fn bytestream(&self, ctx: &RequestContext) -> ByteStreamClient<Channel> {
        ByteStreamClient::new(self.channel_for(ctx))
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }

    /// A Remote Logstream client on the client channel.
    pub fn logstream(&self) -> LogStreamServiceClient<Channel> {
        LogStreamServiceClient::new(self.channel())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }

    /// An Execution client on the client channel.
    pub fn execution(&self) -> ExecutionClient<Channel> {
        ExecutionClient::new(self.channel())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }

    /// A google.longrunning Operations client on the client channel.
    pub fn operations(&self) -> OperationsClient<Channel> {
        OperationsClient::new(self.channel())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }

    /// An ActionCache client on the client channel.
    pub fn action_cache(&self) -> ActionCacheClient<Channel> {
        ActionCacheClient::new(self.channel())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }

    /// A Remote Asset Fetch client on the client channel.
    pub fn asset_fetch(&self) -> FetchClient<Channel> {
        FetchClient::new(self.channel())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }

    /// A Remote Asset Push client on the client channel.
    pub fn asset_push(&self) -> PushClient<Channel> {
        PushClient::new(self.channel())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }

    /// Marks `ctx`'s call of `method` as client work in flight, if it is:
    /// a client's call other than Operations (which may be WaitOperation,
    /// waiting as long as the remote action runs, not using the link) and
    /// the uploads (their bytes cross the link's other direction; prefetch
    /// only uses the one towards Outpost).
    fn client_work(&self, ctx: &RequestContext, method: UpstreamMethod) -> Option<ClientWork> {
        use UpstreamMethod::{BatchUpdateBlobs, ByteStreamWrite, Operations};
        let counts = ctx.priority == Priority::Client
            && !matches!(method, Operations | BatchUpdateBlobs | ByteStreamWrite);
        counts.then(|| self.traffic.client_work())
    }

    /// Waits for a call slot for `ctx`'s call of `method`. The slot carries
    /// the call's client work (taken before the wait: a client call queued
    /// for a slot is client traffic too); hold it until the call or its
    /// stream ends.
    pub async fn slot(&self, ctx: &RequestContext, method: UpstreamMethod) -> Result<CallSlot> {
        let work = self.client_work(ctx, method);
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Error::Internal("upstream permits closed".into()))?;
        Ok(CallSlot {
            _permit: permit,
            _work: work,
        })
    }

    /// Runs one unary upstream call for `ctx` in a call slot (see
    /// [`Upstream::call`]).
    pub async fn unary<T, F, Fut>(
        &self,
        ctx: &RequestContext,
        method: UpstreamMethod,
        call: F,
    ) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = std::result::Result<Response<T>, Status>>,
    {
        let _slot = self.slot(ctx, method).await?;
        self.call(method, call).await
    }

    /// UNAVAILABLE while the upstream is known to be down (see [`Health`]).
    pub fn check_health(&self) -> Result<()> {
        self.health.check()
    }

    /// Whether the upstream is believed reachable, and the last failure
    /// while it is not (for the status report).
    pub fn health(&self) -> (bool, Option<String>) {
        self.health.state()
    }

    /// The link's measurements (fed by the calls made here and by the
    /// ByteStream reads of `store::upstream`).
    pub fn link(&self) -> &Link {
        &self.link
    }

    /// Runs an upstream call (the caller holds a [`CallSlot`], which counts
    /// the client work): fails fast while the
    /// upstream is down, retries transient failures with exponential
    /// backoff, tracks health and counts. `call` is invoked once per attempt;
    /// every call made through here is idempotent, so retrying is safe.
    pub async fn call<T, F, Fut>(&self, method: UpstreamMethod, call: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = std::result::Result<Response<T>, Status>>,
    {
        let attempts = self.config.max_attempts;
        self.retrying(method, attempts, call, |status| self.error(&status))
            .await
    }

    /// [`Upstream::call`] for passthrough, without a call slot but counted
    /// as `ctx`'s work while it runs: a failure keeps the upstream's status
    /// whole ([`Error::Upstream`]), so the client sees the upstream's own
    /// answer.
    pub async fn relay<T, F, Fut>(
        &self,
        ctx: &RequestContext,
        method: UpstreamMethod,
        call: F,
    ) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = std::result::Result<Response<T>, Status>>,
    {
        let _work = self.client_work(ctx, method);
        let attempts = self.config.max_attempts;
        self.retrying(method, attempts, call, Error::relayed).await
    }

    /// [`Upstream::relay`] for a call that cannot be made twice (it forwards
    /// a client's stream as it arrives): the same fail-fast, counting and
    /// health bookkeeping, but one attempt only.
    pub async fn relay_once<T, Fut>(
        &self,
        ctx: &RequestContext,
        method: UpstreamMethod,
        call: Fut,
    ) -> Result<T>
    where
        Fut: Future<Output = std::result::Result<Response<T>, Status>>,
    {
        let _work = self.client_work(ctx, method);
        let mut call = Some(call);
        let once = || {
            let call = call.take();
            async move {
                match call {
                    Some(call) => call.await,
                    None => Err(Status::internal("a one-shot upstream call was retried")),
                }
            }
        };
        self.retrying(method, 1, once, Error::relayed).await
    }

    /// Opens a server-streaming call (Execute, WaitExecution) under the same
    /// policy as [`Upstream::call`]. No call slot is held: the stream stays
    /// open as long as the remote action runs; only the open counts as
    /// client work (the wait for Operations does not use the link). A
    /// failure keeps the upstream's status whole ([`Error::Upstream`]):
    /// execution relays it to its client as it came.
    pub async fn open_stream<T, F, Fut>(
        &self,
        ctx: &RequestContext,
        method: UpstreamMethod,
        call: F,
    ) -> Result<Streaming<T>>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = std::result::Result<Response<Streaming<T>>, Status>>,
    {
        self.relay(ctx, method, call).await
    }

    /// The one retry and health policy behind [`Upstream::call`] and
    /// [`Upstream::open_stream`] (and the relays), trying at most
    /// `attempts` times; `to_error` turns the final status into the
    /// caller's error.
    async fn retrying<T, F, Fut>(
        &self,
        method: UpstreamMethod,
        attempts: u32,
        mut call: F,
        to_error: impl FnOnce(Status) -> Error,
    ) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = std::result::Result<Response<T>, Status>>,
    {
        self.health.check()?;
        let mut delay = FIRST_RETRY_DELAY;
        let mut attempt = 1;
        loop {
            self.stats.upstream_call(method);
            let started = Instant::now();
            match call().await {
                Ok(response) => {
                    if measures_round_trip(method) {
                        self.link.round_trip(started.elapsed());
                    }
                    self.health.succeeded();
                    return Ok(response.into_inner());
                }
                Err(status) => {
                    let transient = is_transient(&status);
                    if transient && attempt < attempts {
                        Stats::add(&self.stats.upstream_retries, 1);
                        tracing::debug!(
                            "upstream {} attempt {attempt} failed: {}; retrying in {delay:?}",
                            method.name(),
                            status.message()
                        );
                        tokio::time::sleep(delay).await;
                        delay *= 2;
                        attempt += 1;
                        continue;
                    }
                    if transient || is_timeout(&status) {
                        // Unreachable after the retries, or silent for a whole
                        // deadline: treat it as down so later calls fail fast.
                        self.health.failed(status.message());
                    } else {
                        // It answered, so it is up; the error is the call's.
                        self.health.succeeded();
                    }
                    self.record_error(&status);
                    return Err(to_error(status));
                }
            }
        }
    }

    /// The error our client gets for an upstream status: same meaning, and a
    /// message naming the upstream.
    pub fn error(&self, status: &Status) -> Error {
        Error::from_upstream(&self.config.uri, status)
    }

    /// Counts a failed upstream call or stream. A broken stream does not
    /// mark the upstream down; the next call finds out.
    pub fn record_error(&self, status: &Status) {
        if status.code() != Code::NotFound {
            Stats::add(&self.stats.upstream_errors, 1);
        }
    }

    /// The upstream's capabilities (cached, refreshed after a few minutes).
    pub async fn capabilities(&self, ctx: &RequestContext) -> Result<ServerCapabilities> {
        if let Some((at, caps)) = &*self.capabilities.lock().unwrap_or_else(|e| e.into_inner())
            && at.elapsed() < CAPABILITIES_TTL
        {
            return Ok(caps.clone());
        }
        let instance = self.instance(ctx);
        let caps = self
            .unary(ctx, UpstreamMethod::GetCapabilities, || {
                let request = self.unary_request(
                    ctx,
                    GetCapabilitiesRequest {
                        instance_name: instance.clone(),
                    },
                );
                let mut client = CapabilitiesClient::new(self.channel());
                async move { client.get_capabilities(request).await }
            })
            .await?;
        *self.capabilities.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((Instant::now(), caps.clone()));
        Ok(caps)
    }

    /// The capabilities last fetched, if any (never calls the upstream).
    pub fn cached_capabilities(&self) -> Option<ServerCapabilities> {
        self.capabilities
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|(_, caps)| caps.clone())
    }

    /// Bytes of blob data that fit in one Batch* call to the upstream.
    pub fn batch_limit(&self) -> u64 {
        let advertised = self
            .cached_capabilities()
            .and_then(|c| c.cache_capabilities)
            .map(|c| c.max_batch_total_size_bytes)
            .filter(|&n| n > 0)
            .map_or(DEFAULT_UPSTREAM_BATCH, |n| n as u64);
        // Even an unlimited upstream is bound by gRPC's default 4 MiB messages.
        advertised
            .min(DEFAULT_UPSTREAM_BATCH)
            .saturating_sub(BATCH_OVERHEAD)
    }
}

/// A call slot (bounds calls in flight) and, for a client's call, its
/// [`ClientWork`]: held for as long as the call or its stream is open.
pub struct CallSlot {
    _permit: OwnedSemaphorePermit,
    _work: Option<ClientWork>,
}
