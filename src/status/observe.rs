//! The observer layer: the outermost layer around every listener's routes
//! (outside authentication, so refused calls count too). For every
//! completed client call it records the gRPC status code, the method and
//! the caller, feeding `outpost_rpc_calls_total`,
//! `outpost_rpc_errors_total{code}`, the client activity table
//! ([`Clients`]) and the error table ([`Errors`]), and it writes one debug
//! line per call (code, elapsed time, tool; the `rpc` span carries the
//! method and the invocation ids).
//!
//! The code of a failure answered before any message is in the response
//! headers (trailers-only); a streamed answer carries it in the trailers,
//! so the body is wrapped to see them. A call whose future or body is
//! dropped before its status was sent (the client went away) counts as
//! CANCELLED.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body as _, Frame, SizeHint};
use tonic::Code;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::metadata::MetadataMap;

use crate::context::{REQUEST_METADATA_HEADER, request_metadata};
use crate::stats::Stats;

use super::clients::{Caller, Clients};
use super::codes::code_name;
use super::errors::Errors;

/// Longest method name kept (request paths come from clients).
const MAX_METHOD: usize = 128;

/// What the observer layer feeds: the counters and the two tables the
/// status report shows.
pub struct Observer {
    stats: Arc<Stats>,
    /// Calls and errors per caller.
    pub clients: Clients,
    /// Errors per code and method.
    pub errors: Errors,
}

impl Observer {
    /// An observer counting into `stats`.
    pub fn new(stats: Arc<Stats>) -> Self {
        Observer {
            stats,
            clients: Clients::default(),
            errors: Errors::default(),
        }
    }

    /// Records one completed call.
    fn complete(&self, call: &Call, code: Code) {
        let failed = is_error(&call.method, code);
        self.stats.rpc_completed(failed.then_some(code));
        let now = Instant::now();
        let mut caller = call.caller.clone();
        if let Some(name) = call.name.0.get() {
            caller.client = name.to_string();
        }
        self.clients.record(&caller, failed, now);
        if failed {
            self.errors.record(code, &call.method, now);
        }
        let elapsed_ms = call.started.elapsed().as_secs_f64() * 1e3;
        let code = code_name(code);
        let tool = &caller.tool;
        match &call.span {
            // The span names the method and the invocation ids.
            Some(span) => tracing::debug!(parent: span, code, elapsed_ms, %tool, "rpc done"),
            None => tracing::debug!(
                method = %call.method,
                code,
                elapsed_ms,
                %tool,
                tool_invocation_id = %caller.invocation,
                "rpc done"
            ),
        }
    }
}

/// The caller's credential name, filled in by the auth layer (inside this
/// one) through the request's extensions: this layer runs before the
/// credential is known.
#[derive(Clone, Default, Debug)]
pub struct CallerName(Arc<OnceLock<Arc<str>>>);

impl CallerName {
    /// Names the caller (the first name set stays).
    pub fn set(&self, name: &Arc<str>) {
        let _ = self.0.set(name.clone());
    }
}

/// Adds [`ObserveService`] around a router.
#[derive(Clone)]
pub struct ObserveLayer {
    observer: Arc<Observer>,
}

impl ObserveLayer {
    /// A layer recording into `observer`.
    pub fn new(observer: Arc<Observer>) -> Self {
        ObserveLayer { observer }
    }
}

impl<S> tower::Layer<S> for ObserveLayer {
    type Service = ObserveService<S>;

    fn layer(&self, inner: S) -> ObserveService<S> {
        ObserveService {
            inner,
            observer: self.observer.clone(),
        }
    }
}

/// Records the outcome of each call it passes on.
#[derive(Clone)]
pub struct ObserveService<S> {
    inner: S,
    observer: Arc<Observer>,
}

impl<S, B> tower::Service<http::Request<B>> for ObserveService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let name = CallerName::default();
        request.extensions_mut().insert(name.clone());
        let mut call = Call {
            observer: self.observer.clone(),
            method: method_of(request.uri().path()),
            caller: caller_of(request.headers()),
            name,
            started: Instant::now(),
            span: None,
            done: false,
        };
        let answer = self.inner.call(request);
        Box::pin(async move {
            // Polled inside the RPC's span (tonic's trace_fn), unless that
            // is filtered out.
            let span = tracing::Span::current();
            call.span = (!span.is_disabled()).then_some(span);
            match answer.await {
                Ok(response) => Ok(call.watch(response)),
                Err(e) => {
                    call.finish(Code::Unknown);
                    Err(e)
                }
            }
        })
    }
}

/// Whether a call that ended with `code` went wrong. Not OK is wrong, but
/// for GetActionResult's NOT_FOUND: that is the action cache's ordinary
/// miss (counted as one), which every cold build has by the thousand, and
/// the page's error table is for what needs looking at.
fn is_error(method: &str, code: Code) -> bool {
    code != Code::Ok && !(code == Code::NotFound && method == "ActionCache/GetActionResult")
}

/// `/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs`
/// → `ContentAddressableStorage/FindMissingBlobs`, as the `rpc` span names it.
fn method_of(path: &str) -> String {
    let short = path.rsplit_once('.').map_or(path, |(_, short)| short);
    short.chars().take(MAX_METHOD).collect()
}

/// The caller by its `RequestMetadata` (only that header is read).
fn caller_of(headers: &http::HeaderMap) -> Caller {
    let metadata = headers.get(REQUEST_METADATA_HEADER).and_then(|raw| {
        let mut only = http::HeaderMap::new();
        only.insert(REQUEST_METADATA_HEADER, raw.clone());
        request_metadata(&MetadataMap::from_headers(only))
    });
    match metadata {
        Some(m) => {
            let (tool, version) = m
                .tool_details
                .as_ref()
                .map_or(("", ""), |t| (&t.tool_name, &t.tool_version));
            Caller::new(tool, version, &m.tool_invocation_id)
        }
        None => Caller::new("", "", ""),
    }
}

/// The `grpc-status` in `headers` (response headers of a trailers-only
/// answer, or trailers); a value that is no code is UNKNOWN.
fn status_in(headers: &http::HeaderMap) -> Option<Code> {
    let value = headers.get("grpc-status")?;
    let code = std::str::from_utf8(value.as_bytes())
        .ok()
        .and_then(|s| s.parse::<i32>().ok())
        .map_or(Code::Unknown, Code::from_i32);
    Some(code)
}

/// One call in progress, recorded exactly once: when its status is seen,
/// or as CANCELLED when dropped before.
struct Call {
    observer: Arc<Observer>,
    method: String,
    caller: Caller,
    /// Filled in by the auth layer.
    name: CallerName,
    started: Instant,
    /// The RPC's span, for the completion line (`None` when disabled).
    span: Option<tracing::Span>,
    done: bool,
}

impl Call {
    fn finish(&mut self, code: Code) {
        if !self.done {
            self.done = true;
            self.observer.complete(self, code);
        }
    }

    /// Records a trailers-only answer now; otherwise wraps the body to see
    /// its trailers.
    fn watch(mut self, response: http::Response<Body>) -> http::Response<Body> {
        if let Some(code) = status_in(response.headers()) {
            self.finish(code);
            return response;
        }
        if response.body().is_end_stream() {
            // No message and no status: gRPC reads that as UNKNOWN.
            self.finish(Code::Unknown);
            return response;
        }
        response.map(|inner| Body::new(ObservedBody { inner, call: self }))
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.finish(Code::Cancelled);
    }
}

/// A response body that records its call when the trailers pass.
struct ObservedBody {
    inner: Body,
    call: Call,
}

impl http_body::Body for ObservedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    this.call
                        .finish(status_in(trailers).unwrap_or(Code::Unknown));
                }
            }
            Poll::Ready(Some(Err(status))) => this.call.finish(status.code()),
            Poll::Ready(None) => this.call.finish(Code::Unknown),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests;
