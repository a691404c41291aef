//! The tower layer that runs the [`Authenticator`] on every request before
//! any service sees it (installed in `server.rs`, inside `decode_status`).
//!
//! An admitted request carries its [`crate::auth::Principal`] in its
//! extensions (per-client limits and services read it there) and the
//! caller's name in the `rpc` span's `client` field. A refused one is
//! answered here with the status as a trailers-only HTTP response.
//!
//! When any credential source is configured, the `authorization` header was
//! meant for Outpost: it is removed from the request, so no service can log
//! it or forward it upstream, whatever `forward_client_headers` says.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::codegen::http::{self, header::AUTHORIZATION};

use crate::peer::Peer;

use super::check::Authenticator;

/// Adds [`AuthService`] around a router.
#[derive(Clone)]
pub struct AuthLayer {
    auth: Arc<Authenticator>,
}

impl AuthLayer {
    /// A layer checking calls with `auth`.
    pub fn new(auth: Arc<Authenticator>) -> Self {
        AuthLayer { auth }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> AuthService<S> {
        AuthService {
            inner,
            auth: self.auth.clone(),
        }
    }
}

/// Authenticates each request, then passes it on or answers the refusal.
#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    auth: Arc<Authenticator>,
}

impl<S, B, R> tower::Service<http::Request<B>> for AuthService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // The clone that was polled ready is the one that takes the call.
        let fresh = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, fresh);
        let auth = self.auth.clone();
        Box::pin(async move {
            let peer = Peer::of(&request).cloned();
            let outcome = auth
                .admit(
                    peer.as_ref(),
                    request.headers().get(AUTHORIZATION).map(|v| v.as_bytes()),
                    request.uri().path(),
                )
                .await;
            // Polled inside the RPC's span (tonic's trace_fn).
            let span = tracing::Span::current();
            match outcome {
                Ok(principal) => {
                    span.record("client", &*principal.name);
                    name_caller(&request, &principal.name);
                    tracing::trace!(role = %principal.role, "admitted");
                    if auth.enabled() {
                        request.headers_mut().remove(AUTHORIZATION);
                    }
                    request.extensions_mut().insert(principal);
                    inner.call(request).await
                }
                Err(refusal) => {
                    if let super::check::Refusal::Denied(principal, _) = &refusal {
                        span.record("client", &*principal.name);
                        name_caller(&request, &principal.name);
                    }
                    let status = refusal.status();
                    tracing::debug!(
                        peer = ?peer.and_then(|p| p.addr),
                        "refused {:?}: {}",
                        status.code(),
                        status.message()
                    );
                    Ok(status.into_http())
                }
            }
        })
    }
}

/// Tells the observer layer (outside this one) who the caller is.
fn name_caller<B>(request: &http::Request<B>, name: &Arc<str>) {
    if let Some(caller) = request
        .extensions()
        .get::<crate::status::observe::CallerName>()
    {
        caller.set(name);
    }
}
