//! Per-request context that store layers may need: the instance name and the
//! client's headers that an upstream call should carry.

use tonic::metadata::{KeyAndValueRef, MetadataMap};

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

/// Who is asking, for which instance, with which credentials.
#[derive(Clone, Debug, Default)]
pub struct RequestContext {
    /// The client's REAPI instance name.
    pub instance: String,
    /// The client's end-to-end headers (credentials, vendor API keys,
    /// `build.bazel.remote.execution.v2.requestmetadata-bin`), for layers that
    /// call an upstream. Hop-by-hop and `grpc-*` headers are already removed.
    pub headers: MetadataMap,
}

impl RequestContext {
    /// A context with no headers (internal work, tests).
    pub fn for_instance(instance: impl Into<String>) -> Self {
        RequestContext {
            instance: instance.into(),
            headers: MetadataMap::new(),
        }
    }

    /// Requests with equal keys may share one upstream call: same instance,
    /// same credentials. Request metadata (per action) is not part of it.
    pub fn group_key(&self) -> String {
        let mut key = self.instance.clone();
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

    /// Captures the end-to-end headers of an incoming call.
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
        }
    }
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
}
