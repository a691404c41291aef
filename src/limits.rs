//! Per-client limits: one runaway client cannot take every call slot of a
//! shared box.
//!
//! [`LimitLayer`] sits on every listener, inside the authentication layer
//! (see `Services::router` in `server.rs`), and gives each client
//! `[limits] max_calls_per_client` call slots. A client is the credential
//! the auth layer put in the request ([`Principal::name`]); without one (no
//! auth layer, or none configured) it is the connection's address, named as
//! the auth layer names unauthenticated callers: `local:unix`,
//! `local:<ip>` for loopback, `anonymous:<ip>` otherwise.
//!
//! A call takes a slot before the service sees it and keeps it until its
//! response body has ended or been dropped, so a streaming call (ByteStream
//! Read and Write, Execute, WaitExecution) holds its slot for as long as it
//! runs. A call over the limit waits up to `queue_timeout` for a slot, then
//! fails with RESOURCE_EXHAUSTED and a `google.rpc.RetryInfo` detail.
//!
//! Bytes in flight need no budget of their own: HTTP/2 flow control already
//! bounds what a call can make Outpost buffer (see docs/architecture.md,
//! "Per-client limits").

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http_body::{Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::body::Body;
use tonic::codegen::http::{Request, Response};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt as _};

use crate::auth::Principal;
use crate::config::LimitsConfig;
use crate::peer::{Peer, Transport};
use crate::stats::Stats;

/// How long a refused client is told to wait before it retries.
pub const RETRY_DELAY: Duration = Duration::from_secs(1);

/// The map of clients is swept of idle ones when it reaches this size, or
/// twice its size after the last sweep, whichever is larger: it holds at
/// most about twice the number of clients with calls open.
const MIN_SWEEP: usize = 64;

/// The call slots of every client, shared by all listeners (a credential
/// used over TCP and the unix socket at once has one set of slots).
pub struct ClientLimits {
    /// Slots per client (`max_calls_per_client`).
    max_calls: usize,
    /// How long a call waits for a slot (`queue_timeout`).
    queue_timeout: Duration,
    /// Each client's slots, by name.
    clients: Mutex<Clients>,
    /// Waits and refusals are counted here.
    stats: Arc<Stats>,
}

/// The clients' semaphores. An entry nobody else holds a reference to (no
/// call open, none waiting) is idle and dropped at the next sweep.
struct Clients {
    by_name: HashMap<Arc<str>, Arc<Semaphore>>,
    /// The size at which the next insertion sweeps idle entries first.
    sweep_at: usize,
}

impl ClientLimits {
    /// Slots per `config`, counting into `stats`.
    pub fn new(config: &LimitsConfig, stats: Arc<Stats>) -> Self {
        ClientLimits {
            max_calls: config.max_calls_per_client.max(1),
            queue_timeout: config.queue_timeout,
            clients: Mutex::new(Clients {
                by_name: HashMap::new(),
                sweep_at: MIN_SWEEP,
            }),
            stats,
        }
    }

    /// Takes one of `client`'s slots, waiting up to the queue timeout; the
    /// slot is free again when the returned [`Slot`] drops.
    pub async fn acquire(&self, client: &str) -> Result<Slot, Status> {
        let slots = self.slots_of(client);
        if let Ok(permit) = slots.clone().try_acquire_owned() {
            return Ok(Slot::new(permit, &self.stats));
        }
        Stats::add(&self.stats.client_limit_waits, 1);
        let _waiting = Waiting::start(&self.stats);
        match tokio::time::timeout(self.queue_timeout, slots.acquire_owned()).await {
            Ok(Ok(permit)) => Ok(Slot::new(permit, &self.stats)),
            // The semaphore is never closed; a timeout is the only failure.
            Ok(Err(_)) | Err(_) => {
                Stats::add(&self.stats.client_limit_refusals, 1);
                tracing::info!(
                    client,
                    limit = self.max_calls,
                    "refused a call: the client's call slots stayed full for {:?}",
                    self.queue_timeout
                );
                Err(self.refusal(client))
            }
        }
    }

    /// RESOURCE_EXHAUSTED naming the client and the limit, with RetryInfo.
    fn refusal(&self, client: &str) -> Status {
        Status::with_error_details(
            Code::ResourceExhausted,
            format!(
                "client {client:?} has {} calls open, the most one client may have \
                 ([limits] max_calls_per_client), and none ended within {:?}; retry later",
                self.max_calls, self.queue_timeout
            ),
            ErrorDetails::with_retry_info(Some(RETRY_DELAY)),
        )
    }

    /// `client`'s semaphore, made on first use.
    fn slots_of(&self, client: &str) -> Arc<Semaphore> {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slots) = clients.by_name.get(client) {
            return slots.clone();
        }
        if clients.by_name.len() >= clients.sweep_at {
            // Only the map holds an idle entry: no permit, no waiter.
            clients
                .by_name
                .retain(|_, slots| Arc::strong_count(slots) > 1);
            clients.sweep_at = (clients.by_name.len() * 2).max(MIN_SWEEP);
        }
        let slots = Arc::new(Semaphore::new(self.max_calls));
        clients.by_name.insert(client.into(), slots.clone());
        slots
    }

    /// Clients remembered (with calls open, or idle since the last sweep).
    pub fn remembered(&self) -> usize {
        let clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        clients.by_name.len()
    }
}

/// One call slot of one client, counted in the `client_calls_open` gauge;
/// dropping it frees the slot.
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    stats: Arc<Stats>,
}

impl Slot {
    fn new(permit: OwnedSemaphorePermit, stats: &Arc<Stats>) -> Self {
        Stats::add(&stats.client_calls_open, 1);
        Slot {
            _permit: permit,
            stats: stats.clone(),
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.stats.client_calls_open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts a waiting call in the `client_limit_waiting` gauge while it lives.
struct Waiting<'a>(&'a Stats);

impl<'a> Waiting<'a> {
    fn start(stats: &'a Stats) -> Self {
        Stats::add(&stats.client_limit_waiting, 1);
        Waiting(stats)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.client_limit_waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Who a request counts against: the credential's name when the auth layer
/// authenticated it, else the connection's address (see the module doc).
pub fn client_name<B>(request: &Request<B>) -> Arc<str> {
    if let Some(principal) = request.extensions().get::<Principal>() {
        return principal.name.clone();
    }
    match Peer::of(request) {
        Some(peer) => peer_name(peer).into(),
        None => "unknown".into(),
    }
}

/// The name of an unauthenticated peer, as the auth layer names it.
fn peer_name(peer: &Peer) -> String {
    match (peer.transport, peer.addr) {
        (Transport::Unix, _) => "local:unix".to_string(),
        (_, Some(addr)) => {
            let ip = addr.ip().to_canonical();
            if ip.is_loopback() {
                format!("local:{ip}")
            } else {
                format!("anonymous:{ip}")
            }
        }
        (_, None) => "unknown".to_string(),
    }
}

/// The tower layer for `Server::builder().layer(..)`.
#[derive(Clone)]
pub struct LimitLayer {
    limits: Arc<ClientLimits>,
}

impl LimitLayer {
    /// A layer over `limits` (one for all listeners).
    pub fn new(limits: Arc<ClientLimits>) -> Self {
        LimitLayer { limits }
    }
}

impl<S> tower::Layer<S> for LimitLayer {
    type Service = Limit<S>;

    fn layer(&self, inner: S) -> Limit<S> {
        Limit {
            inner,
            limits: self.limits.clone(),
        }
    }
}

/// The service [`LimitLayer`] wraps around the routes.
#[derive(Clone)]
pub struct Limit<S> {
    inner: S,
    limits: Arc<ClientLimits>,
}

impl<S, B> tower::Service<Request<B>> for Limit<S>
where
    S: tower::Service<Request<B>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send,
    B: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        // The clone is not ready; the service that was polled ready is.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let limits = self.limits.clone();
        Box::pin(async move {
            let client = client_name(&request);
            let slot = match limits.acquire(&client).await {
                Ok(slot) => slot,
                Err(status) => return Ok(status.into_http()),
            };
            let response = inner.call(request).await?;
            Ok(response.map(|body| {
                Body::new(HoldSlot {
                    body,
                    slot: Some(slot),
                })
            }))
        })
    }
}

/// A response body that keeps the call's slot until it ends or is dropped.
struct HoldSlot {
    body: Body,
    /// Taken (freed) when the body ends.
    slot: Option<Slot>,
}

impl http_body::Body for HoldSlot {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<bytes::Bytes>, Status>>> {
        let frame = Pin::new(&mut self.body).poll_frame(cx);
        if matches!(frame, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            self.slot = None;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max: usize, wait_ms: u64) -> ClientLimits {
        let config = LimitsConfig {
            max_calls_per_client: max,
            queue_timeout: Duration::from_millis(wait_ms),
        };
        ClientLimits::new(&config, Arc::new(Stats::default()))
    }

    fn peer(addr: Option<&str>, transport: Transport) -> Peer {
        Peer::for_tests(addr, transport)
    }

    #[test]
    fn a_client_is_its_credential_else_its_address() {
        let named = |peer: Option<Peer>, principal: Option<&str>| {
            let mut request = Request::new(());
            if let Some(peer) = peer {
                request.extensions_mut().insert(peer);
            }
            if let Some(name) = principal {
                request.extensions_mut().insert(Principal {
                    name: name.into(),
                    role: crate::auth::Role::Read,
                    write_ac: false,
                });
            }
            client_name(&request).to_string()
        };
        let tcp = |a| Some(peer(Some(a), Transport::Tcp));
        assert_eq!(named(tcp("10.1.2.3:5"), Some("ci")), "ci");
        assert_eq!(named(tcp("10.1.2.3:5"), None), "anonymous:10.1.2.3");
        assert_eq!(named(tcp("127.0.0.1:5"), None), "local:127.0.0.1");
        assert_eq!(named(tcp("[::ffff:127.0.0.1]:5"), None), "local:127.0.0.1");
        assert_eq!(named(tcp("[::1]:5"), None), "local:::1");
        let tls = Some(peer(Some("192.168.0.9:7"), Transport::Tls));
        assert_eq!(named(tls, None), "anonymous:192.168.0.9");
        assert_eq!(named(Some(peer(None, Transport::Unix)), None), "local:unix");
        assert_eq!(named(None, None), "unknown");
    }

    #[tokio::test]
    async fn a_full_client_waits_then_is_refused_with_a_retry_hint() {
        let limits = limits(2, 50);
        let a = limits.acquire("a").await.unwrap();
        let _b = limits.acquire("a").await.unwrap();
        // Another client has slots of its own.
        let _other = limits.acquire("other").await.unwrap();
        let status = limits.acquire("a").await.unwrap_err();
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert!(
            status.message().contains("\"a\" has 2 calls open"),
            "{status:?}"
        );
        let retry = status.get_details_retry_info().expect("a RetryInfo detail");
        assert_eq!(retry.retry_delay, Some(RETRY_DELAY));
        assert_eq!(Stats::get(&limits.stats.client_limit_waits), 1);
        assert_eq!(Stats::get(&limits.stats.client_limit_refusals), 1);
        assert_eq!(Stats::get(&limits.stats.client_limit_waiting), 0);
        assert_eq!(Stats::get(&limits.stats.client_calls_open), 3);
        drop(a);
        assert!(limits.acquire("a").await.is_ok(), "a freed slot is taken");
    }

    #[tokio::test]
    async fn a_waiting_call_takes_the_first_slot_freed() {
        let limits = Arc::new(limits(1, 10_000));
        let held = limits.acquire("a").await.unwrap();
        let waiter = tokio::spawn({
            let limits = limits.clone();
            async move { limits.acquire("a").await.map(drop) }
        });
        while Stats::get(&limits.stats.client_limit_waiting) == 0 {
            tokio::task::yield_now().await;
        }
        drop(held);
        waiter.await.unwrap().expect("the waiter gets the slot");
        assert_eq!(Stats::get(&limits.stats.client_limit_refusals), 0);
        assert_eq!(Stats::get(&limits.stats.client_limit_waiting), 0);
    }

    #[tokio::test]
    async fn idle_clients_are_forgotten() {
        let limits = limits(1, 10);
        let busy = limits.acquire("busy").await.unwrap();
        for i in 0..10 * MIN_SWEEP {
            drop(limits.acquire(&format!("client {i}")).await.unwrap());
        }
        assert!(limits.remembered() <= MIN_SWEEP, "{}", limits.remembered());
        // The busy client was kept: its one slot is still taken.
        assert!(limits.acquire("busy").await.is_err());
        drop(busy);
    }
}
