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
        self.stats.rpc_completed(code);
        let now = Instant::now();
        let mut caller = call.caller.clone();
        if let Some(name) = call.name.0.get() {
            caller.client = name.to_string();
        }
        self.clients.record(&caller, code != Code::Ok, now);
        if code != Code::Ok {
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
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use tower::{Service, ServiceExt};

    /// A response body of the given frames.
    struct Frames(VecDeque<Frame<Bytes>>);

    impl http_body::Body for Frames {
        type Data = Bytes;
        type Error = tonic::Status;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
            Poll::Ready(self.0.pop_front().map(Ok))
        }
    }

    fn streamed(code: Code) -> http::Response<Body> {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", (code as i32).to_string().parse().unwrap());
        let frames = [
            Frame::data(Bytes::from_static(b"\0\0\0\0\0")),
            Frame::trailers(trailers),
        ];
        http::Response::new(Body::new(Frames(frames.into())))
    }

    fn request(path: &str, tool: Option<(&str, &str)>) -> http::Request<()> {
        let mut builder = http::Request::builder().uri(path);
        if let Some((name, invocation)) = tool {
            let metadata =
                bazel_remote_apis::build::bazel::remote::execution::v2::RequestMetadata {
                    tool_details: Some(
                        bazel_remote_apis::build::bazel::remote::execution::v2::ToolDetails {
                            tool_name: name.into(),
                            tool_version: "1.0".into(),
                        },
                    ),
                    tool_invocation_id: invocation.into(),
                    ..Default::default()
                };
            let mut headers = MetadataMap::new();
            headers.insert_bin(
                REQUEST_METADATA_HEADER,
                tonic::metadata::MetadataValue::from_bytes(&prost::Message::encode_to_vec(
                    &metadata,
                )),
            );
            let value = headers.into_headers()[REQUEST_METADATA_HEADER].clone();
            builder = builder.header(REQUEST_METADATA_HEADER, value);
        }
        builder.body(()).unwrap()
    }

    /// Runs one call through the layer around a service answering `answer`,
    /// then reads its body to the end when `read_body`.
    async fn call(
        observer: &Arc<Observer>,
        req: http::Request<()>,
        answer: http::Response<Body>,
        read_body: bool,
    ) {
        let answer = std::sync::Mutex::new(Some(answer));
        let inner = tower::service_fn(move |_: http::Request<()>| {
            let response = answer.lock().unwrap().take().unwrap();
            async move { Ok::<_, std::convert::Infallible>(response) }
        });
        let service = ObserveLayer::new(observer.clone()).layer_on(inner);
        let response = service.oneshot(req).await.unwrap();
        if read_body {
            let mut body = response.into_body();
            while std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx))
                .await
                .is_some()
            {}
        }
    }

    trait LayerOn<S> {
        fn layer_on(&self, inner: S) -> ObserveService<S>;
    }

    impl<S> LayerOn<S> for ObserveLayer {
        fn layer_on(&self, inner: S) -> ObserveService<S> {
            tower::Layer::layer(self, inner)
        }
    }

    fn error_count(observer: &Observer, code: &str) -> u64 {
        let errors = observer.errors.most_frequent(100, Instant::now());
        errors
            .iter()
            .filter(|e| e.code == code)
            .map(|e| e.count)
            .sum()
    }

    #[tokio::test]
    async fn every_call_is_counted_with_its_code_and_caller() {
        let stats = Arc::new(Stats::default());
        let observer = Arc::new(Observer::new(stats.clone()));
        let path = "/build.bazel.remote.execution.v2.ActionCache/GetActionResult";
        // Trailers-only: the code is in the response headers.
        let refused = tonic::Status::not_found("no").into_http::<Body>();
        call(
            &observer,
            request(path, Some(("bazel", "inv-1"))),
            refused,
            false,
        )
        .await;
        // Streamed: the code is in the trailers.
        let ok = streamed(Code::Ok);
        call(&observer, request(path, Some(("bazel", "inv-1"))), ok, true).await;
        let failed = streamed(Code::DataLoss);
        call(
            &observer,
            request("/google.bytestream.ByteStream/Read", None),
            failed,
            true,
        )
        .await;
        assert_eq!(Stats::get(&stats.rpc_calls), 3);
        assert_eq!(Stats::get(&stats.rpc_errors[Code::NotFound as usize]), 1);
        assert_eq!(Stats::get(&stats.rpc_errors[Code::DataLoss as usize]), 1);
        assert_eq!(stats.rpc_errors_total(), 2);
        let errors = observer.errors.most_frequent(10, Instant::now());
        let rows: Vec<_> = errors
            .iter()
            .map(|e| (e.code.as_str(), e.method.as_str()))
            .collect();
        assert!(
            rows.contains(&("NOT_FOUND", "ActionCache/GetActionResult")),
            "{rows:?}"
        );
        assert!(rows.contains(&("DATA_LOSS", "ByteStream/Read")), "{rows:?}");
        let clients = observer.clients.busiest(10, Instant::now());
        assert_eq!(clients[0].tool, "bazel 1.0");
        assert_eq!(clients[0].invocation, "inv-1");
        assert_eq!((clients[0].calls, clients[0].errors), (2, 1));
        assert_eq!(clients[1].tool, "unknown");
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_status_is_cancelled() {
        let stats = Arc::new(Stats::default());
        let observer = Arc::new(Observer::new(stats.clone()));
        let path = "/google.bytestream.ByteStream/Read";
        call(&observer, request(path, None), streamed(Code::Ok), false).await;
        assert_eq!(Stats::get(&stats.rpc_calls), 1);
        assert_eq!(error_count(&observer, "CANCELLED"), 1);
    }

    #[tokio::test]
    async fn a_call_dropped_before_its_answer_is_cancelled() {
        let stats = Arc::new(Stats::default());
        let observer = Arc::new(Observer::new(stats.clone()));
        let inner = tower::service_fn(|_: http::Request<()>| {
            std::future::pending::<Result<http::Response<Body>, std::convert::Infallible>>()
        });
        let mut service = ObserveLayer::new(observer.clone()).layer_on(inner);
        let future = service.call(request("/x.Y/Z", None));
        drop(future);
        assert_eq!(Stats::get(&stats.rpc_calls), 1);
        assert_eq!(error_count(&observer, "CANCELLED"), 1);
    }

    #[tokio::test]
    async fn the_auth_layer_names_the_caller() {
        let stats = Arc::new(Stats::default());
        let observer = Arc::new(Observer::new(stats.clone()));
        let inner = tower::service_fn(|req: http::Request<()>| async move {
            let name: Arc<str> = Arc::from("ci-token");
            req.extensions().get::<CallerName>().unwrap().set(&name);
            Ok::<_, std::convert::Infallible>(tonic::Status::ok("").into_http::<Body>())
        });
        let service = ObserveLayer::new(observer.clone()).layer_on(inner);
        service.oneshot(request("/x.Y/Z", None)).await.unwrap();
        let clients = observer.clients.busiest(10, Instant::now());
        assert_eq!(clients[0].client, "ci-token");
    }

    #[tokio::test]
    async fn each_call_logs_one_debug_line_without_header_values() {
        use std::sync::Mutex;
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let sink = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || Writer(sink.clone()))
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        let observer = Arc::new(Observer::new(Arc::new(Stats::default())));
        let path = "/build.bazel.remote.execution.v2.ActionCache/GetActionResult";
        let mut req = request(path, Some(("bazel", "inv-7")));
        req.headers_mut()
            .insert("authorization", "Bearer secret-token".parse().unwrap());
        let refused = tonic::Status::not_found("no").into_http::<Body>();
        call(&observer, req, refused, false).await;
        let log = String::from_utf8(buffer.lock().unwrap().clone()).unwrap();
        assert_eq!(log.matches("rpc done").count(), 1, "{log}");
        for field in [
            "method=ActionCache/GetActionResult",
            "code=\"NOT_FOUND\"",
            "elapsed_ms=",
            "tool=bazel 1.0",
            "tool_invocation_id=inv-7",
        ] {
            assert!(log.contains(field), "{field} in {log}");
        }
        assert!(!log.contains("secret-token"), "{log}");
    }

    struct Writer(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Writer {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(data);
            Ok(data.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}
