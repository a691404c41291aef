//! Per-request context: the instance name and the client's headers that an
//! upstream call should carry (for store layers), and the tracing span that
//! ties one RPC's log lines to the client's build (for the server).

use bazel_remote_apis::build::bazel::remote::execution::v2::RequestMetadata;
use prost::Message;
use tonic::codegen::http;
use tonic::metadata::{KeyAndValueRef, MetadataMap};
use tracing::field::Empty;

/// The header in which REAPI clients send a [`RequestMetadata`] (binary,
/// base64 on the wire): which tool, invocation and action a call is for.
pub const REQUEST_METADATA_HEADER: &str = "build.bazel.remote.execution.v2.requestmetadata-bin";

/// Headers never forwarded: HTTP/2 and gRPC transport headers that belong to
/// one hop only.
const HOP_HEADERS: &[&str] = &[
    "content-type",
    "te",
    "user-agent",
    "host",
    "connection",
    "accept-encoding",
    "content-length",
];

/// Whose work an upstream call is: a client waiting for it, or prefetch,
/// which must only use the link capacity clients leave idle.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Priority {
    /// A client is waiting for the answer.
    #[default]
    Client,
    /// Work done ahead of any client (output prefetch): yields to clients.
    Prefetch,
}

/// Who is asking, for which instance, with which credentials.
#[derive(Clone, Debug, Default)]
pub struct RequestContext {
    /// The client's REAPI instance name.
    pub instance: String,
    /// The client's end-to-end headers (credentials, vendor API keys,
    /// `build.bazel.remote.execution.v2.requestmetadata-bin`), for layers that
    /// call an upstream. Hop-by-hop and `grpc-*` headers are already removed.
    pub headers: MetadataMap,
    /// Whether a client waits for this work or prefetch does it ahead.
    pub priority: Priority,
}

impl RequestContext {
    /// A context with no headers (internal work, tests).
    pub fn for_instance(instance: impl Into<String>) -> Self {
        RequestContext {
            instance: instance.into(),
            headers: MetadataMap::new(),
            priority: Priority::Client,
        }
    }

    /// The same request, done at `priority` (prefetch marks its work so).
    pub fn with_priority(mut self, priority: Priority) -> Self {
        self.priority = priority;
        self
    }

    /// Requests with equal keys may share one upstream call: same instance,
    /// same credentials, same priority. Request metadata (per action) is not
    /// part of it.
    pub fn group_key(&self) -> String {
        let mut key = self.instance.clone();
        if self.priority == Priority::Prefetch {
            key.push_str("\0prefetch");
        }
        for entry in self.headers.iter() {
            if let KeyAndValueRef::Ascii(name, value) = entry {
                key.push('\0');
                key.push_str(name.as_str());
                key.push('=');
                key.push_str(value.to_str().unwrap_or("?"));
            }
        }
        key
    }

    /// Captures the end-to-end headers of an incoming call. When Outpost
    /// checks credentials itself (`[auth]`), the auth layer has already
    /// removed `authorization`: that header was meant for Outpost and is
    /// never forwarded upstream, whatever `forward_client_headers` says.
    pub fn from_metadata(instance: impl Into<String>, incoming: &MetadataMap) -> Self {
        let mut headers = MetadataMap::new();
        for entry in incoming.iter() {
            match entry {
                KeyAndValueRef::Ascii(key, value) => {
                    let name = key.as_str();
                    if !HOP_HEADERS.contains(&name) && !name.starts_with("grpc-") {
                        headers.append(key.clone(), value.clone());
                    }
                }
                KeyAndValueRef::Binary(key, value) => {
                    if !key.as_str().starts_with("grpc-") {
                        headers.append_bin(key.clone(), value.clone());
                    }
                }
            }
        }
        RequestContext {
            instance: instance.into(),
            headers,
            priority: Priority::Client,
        }
    }
}

/// The client's [`RequestMetadata`], if it sent a well-formed one.
pub fn request_metadata(headers: &MetadataMap) -> Option<RequestMetadata> {
    let value = headers.get_bin(REQUEST_METADATA_HEADER)?;
    RequestMetadata::decode(value.to_bytes().ok()?).ok()
}

/// The span every incoming RPC runs in (installed once, with tonic's
/// `trace_fn`, in `server.rs`): the method, and the client's
/// `tool_invocation_id`, `correlated_invocations_id` and `action_id`, so one
/// build's calls can be picked out of the log, and (recorded by the auth
/// layer, `crate::auth::layer`) the `client`: the caller's credential name. Only those ids are recorded,
/// never other headers (they may hold credentials). At trace level each RPC
/// also logs one `rpc` line when it starts; the one debug line per call is
/// the observer layer's at its end (`crate::status::observe`).
pub fn rpc_span(request: &http::Request<()>) -> tracing::Span {
    let path = request.uri().path();
    // "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs"
    // -> "ContentAddressableStorage/FindMissingBlobs"
    let method = path.rsplit_once('.').map_or(path, |(_, short)| short);
    let span = tracing::info_span!(
        "rpc",
        method,
        tool_invocation_id = Empty,
        correlated_invocations_id = Empty,
        action_id = Empty,
        // The credential's name (never the secret), set by the auth layer.
        client = Empty,
    );
    if span.is_disabled() {
        return span;
    }
    if let Some(raw) = request.headers().get(REQUEST_METADATA_HEADER) {
        let mut only = http::HeaderMap::new();
        only.insert(REQUEST_METADATA_HEADER, raw.clone());
        if let Some(metadata) = request_metadata(&MetadataMap::from_headers(only)) {
            let ids = [
                ("tool_invocation_id", &metadata.tool_invocation_id),
                (
                    "correlated_invocations_id",
                    &metadata.correlated_invocations_id,
                ),
                ("action_id", &metadata.action_id),
            ];
            for (field, value) in ids {
                if !value.is_empty() {
                    span.record(field, value.as_str());
                }
            }
        }
    }
    tracing::trace!(parent: &span, "rpc");
    span
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_credentials_and_request_metadata_drops_hop_headers() {
        let mut incoming = MetadataMap::new();
        incoming.insert("authorization", "Bearer x".parse().unwrap());
        incoming.insert("user-agent", "grpc-java".parse().unwrap());
        incoming.insert("grpc-timeout", "5S".parse().unwrap());
        incoming.insert_bin(
            "build.bazel.remote.execution.v2.requestmetadata-bin",
            tonic::metadata::MetadataValue::from_bytes(b"\x0a\x00"),
        );
        let ctx = RequestContext::from_metadata("i", &incoming);
        assert_eq!(ctx.headers.len(), 2);
        assert!(ctx.headers.get("authorization").is_some());
        assert!(ctx.headers.get("user-agent").is_none());
    }

    #[test]
    fn prefetch_work_never_shares_a_call_with_client_work() {
        let client = RequestContext::for_instance("i");
        let prefetch = client.clone().with_priority(Priority::Prefetch);
        assert_ne!(client.group_key(), prefetch.group_key());
        assert_eq!(
            prefetch.group_key(),
            RequestContext::for_instance("i")
                .with_priority(Priority::Prefetch)
                .group_key()
        );
    }

    #[test]
    fn request_metadata_is_read_from_the_binary_header() {
        let sent = RequestMetadata {
            tool_invocation_id: "inv-1".into(),
            action_id: "abc".into(),
            ..Default::default()
        };
        let mut incoming = MetadataMap::new();
        incoming.insert_bin(
            REQUEST_METADATA_HEADER,
            tonic::metadata::MetadataValue::from_bytes(&sent.encode_to_vec()),
        );
        assert_eq!(request_metadata(&incoming), Some(sent));
        assert_eq!(request_metadata(&MetadataMap::new()), None);
    }

    /// Log lines written while `f` runs, with a trace-level fmt subscriber.
    fn logged(f: impl FnOnce()) -> String {
        use std::sync::{Arc, Mutex};
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let sink = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || Writer(sink.clone()))
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let bytes = buffer.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    struct Writer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Writer {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(data);
            Ok(data.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn request(metadata: Option<&str>) -> http::Request<()> {
        let mut builder = http::Request::builder()
            .uri("/build.bazel.remote.execution.v2.ActionCache/GetActionResult")
            .header("authorization", "Bearer secret-token");
        if let Some(value) = metadata {
            builder = builder.header(REQUEST_METADATA_HEADER, value);
        }
        builder.body(()).unwrap()
    }

    #[test]
    fn the_rpc_span_names_the_method_and_the_invocation_but_no_credentials() {
        let metadata = RequestMetadata {
            tool_invocation_id: "inv-1".into(),
            correlated_invocations_id: "build-7".into(),
            action_id: "abc".into(),
            ..Default::default()
        };
        let mut headers = MetadataMap::new();
        headers.insert_bin(
            REQUEST_METADATA_HEADER,
            tonic::metadata::MetadataValue::from_bytes(&metadata.encode_to_vec()),
        );
        let encoded = headers.into_headers()[REQUEST_METADATA_HEADER]
            .to_str()
            .unwrap()
            .to_string();
        let log = logged(|| {
            let _span = rpc_span(&request(Some(&encoded)));
        });
        assert!(
            log.contains("rpc{method=\"ActionCache/GetActionResult\""),
            "{log}"
        );
        assert!(log.contains("tool_invocation_id=\"inv-1\""), "{log}");
        assert!(
            log.contains("correlated_invocations_id=\"build-7\""),
            "{log}"
        );
        assert!(log.contains("action_id=\"abc\""), "{log}");
        assert!(!log.contains("secret-token"), "{log}");
    }

    #[test]
    fn a_malformed_or_missing_request_metadata_still_gets_a_span() {
        let log = logged(|| {
            let _ = rpc_span(&request(Some("not base64 of a proto!")));
            let _ = rpc_span(&request(None));
        });
        assert_eq!(
            log.matches("ActionCache/GetActionResult").count(),
            2,
            "{log}"
        );
        assert!(!log.contains("tool_invocation_id"), "{log}");
    }
}
