//! The observer layer around fake services: codes from headers and
//! trailers, early drops, callers, the log line.

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
        let metadata = bazel_remote_apis::build::bazel::remote::execution::v2::RequestMetadata {
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
            tonic::metadata::MetadataValue::from_bytes(&prost::Message::encode_to_vec(&metadata)),
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
    let refused = tonic::Status::permission_denied("no").into_http::<Body>();
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
    assert_eq!(
        Stats::get(&stats.rpc_errors[Code::PermissionDenied as usize]),
        1
    );
    assert_eq!(Stats::get(&stats.rpc_errors[Code::DataLoss as usize]), 1);
    assert_eq!(stats.rpc_errors_total(), 2);
    let errors = observer.errors.most_frequent(10, Instant::now());
    let rows: Vec<_> = errors
        .iter()
        .map(|e| (e.code.as_str(), e.method.as_str()))
        .collect();
    assert!(
        rows.contains(&("PERMISSION_DENIED", "ActionCache/GetActionResult")),
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
    let refused = tonic::Status::permission_denied("no").into_http::<Body>();
    call(&observer, req, refused, false).await;
    let log = String::from_utf8(buffer.lock().unwrap().clone()).unwrap();
    assert_eq!(log.matches("rpc done").count(), 1, "{log}");
    for field in [
        "method=ActionCache/GetActionResult",
        "code=\"PERMISSION_DENIED\"",
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

#[test]
fn an_action_cache_miss_is_not_an_error() {
    assert!(!is_error("ActionCache/GetActionResult", Code::NotFound));
    assert!(is_error(
        "ActionCache/GetActionResult",
        Code::PermissionDenied
    ));
    assert!(is_error("ByteStream/Read", Code::NotFound));
    assert!(!is_error("ByteStream/Read", Code::Ok));
}
