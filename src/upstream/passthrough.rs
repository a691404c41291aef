//! Remote Logstream passthrough: `CreateLogStream`, and every ByteStream
//! call on a name that is not a CAS name (see
//! [`is_cas_name`](crate::reapi::resource::is_cas_name)), forwarded
//! unchanged to the logstream endpoint (`[upstream] logstream_endpoint`).
//!
//! - Names, offsets, limits and data go through as they came: these names
//!   are defined by the upstream, so no instance-name mapping applies.
//! - Streams are relayed message by message, never buffered whole, cached
//!   or verified; HTTP/2 flow control gives back-pressure both ways.
//! - No deadline shorter than the client's: the unary `rpc_timeout` is not
//!   set; the client's own `grpc-timeout`, if any, is passed on.
//! - A client that goes away drops the upstream call (the upstream sees it
//!   cancelled: servers count their log readers).
//! - A write name embeds a secret: nothing here logs a resource name or
//!   puts one in an error message.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bazel_remote_apis::build::bazel::remote::logstream::v1::{CreateLogStreamRequest, LogStream};
use bazel_remote_apis::google::bytestream::{
    QueryWriteStatusRequest, QueryWriteStatusResponse, ReadRequest, ReadResponse, WriteRequest,
    WriteResponse,
};
use futures::future::Either;
use futures::{Stream, StreamExt};
use tokio::sync::oneshot;
use tonic::metadata::MetadataMap;
use tonic::{Request, Status, Streaming};

use crate::config::UpstreamConfig;
use crate::context::RequestContext;
use crate::error::{Error, Result};
use crate::stats::{Stats, UpstreamMethod};
use crate::upstream::Upstream;

/// A relayed ByteStream Read: the upstream's messages and final status.
pub type PassthroughRead =
    Pin<Box<dyn Stream<Item = std::result::Result<ReadResponse, Status>> + Send>>;

/// The connection to the logstream endpoint and the calls forwarded on it.
pub struct Passthrough {
    /// Its own connection (own health), with the `[upstream]` settings.
    /// Its client work is counted apart, in a traffic gate no prefetch
    /// waits at: a log stream is read for as long as an action runs, at
    /// the rate the log grows, and must not hold prefetch back meanwhile.
    upstream: Upstream,
}

impl Passthrough {
    /// Connects (lazily) to `config.logstream_uri` with the other
    /// `[upstream]` settings (TLS, headers, retries).
    pub fn new(config: &UpstreamConfig, stats: Arc<Stats>) -> anyhow::Result<Self> {
        let upstream = Upstream::new(config.with_endpoint(&config.logstream_uri), stats)?;
        Ok(Passthrough { upstream })
    }

    /// Forwards `CreateLogStream`. The `parent` is a resource name the
    /// upstream defines (not an instance name): it goes through unmapped.
    pub async fn create_log_stream(
        &self,
        metadata: &MetadataMap,
        message: CreateLogStreamRequest,
    ) -> Result<LogStream> {
        let up = &self.upstream;
        let ctx = RequestContext::from_metadata(String::new(), metadata);
        up.unary(&ctx, UpstreamMethod::CreateLogStream, || {
            let mut client = up.logstream();
            let request = up.unary_request(&ctx, message.clone());
            async move { client.create_log_stream(request).await }
        })
        .await
    }

    /// Opens the upstream Read and returns its messages as they arrive.
    /// Dropping the returned stream cancels the upstream call.
    pub async fn read(
        &self,
        metadata: &MetadataMap,
        message: ReadRequest,
    ) -> Result<PassthroughRead> {
        let up = &self.upstream;
        let ctx = RequestContext::from_metadata(String::new(), metadata);
        let stream = up
            .open_stream(&ctx, UpstreamMethod::ByteStreamPassthrough, || {
                let mut client = up.bytestream(&ctx);
                let request = self.forwarded(metadata, message.clone());
                async move { client.read(request).await }
            })
            .await?;
        Ok(Box::pin(stream))
    }

    /// Forwards a Write whose `first` message the caller already took from
    /// `rest`. The client's messages are sent on as the upstream accepts
    /// them. One attempt only: a stream cannot be replayed; the client
    /// resumes with QueryWriteStatus as ByteStream intends.
    pub async fn write(
        &self,
        metadata: &MetadataMap,
        first: WriteRequest,
        rest: Streaming<WriteRequest>,
    ) -> Result<WriteResponse> {
        let (broke_tx, broke_rx) = oneshot::channel::<Status>();
        // A broken client stream (or one whose message does not decode)
        // must not look like a clean end to the upstream: the outbound
        // stream stalls instead, and the call is dropped (reset) below.
        let rest = rest.scan(Some(broke_tx), |broke, next| match next {
            Ok(message) => Either::Left(futures::future::ready(Some(message))),
            Err(status) => {
                if let Some(broke) = broke.take() {
                    let _ = broke.send(status);
                }
                Either::Right(futures::future::pending())
            }
        });
        let outbound = futures::stream::once(futures::future::ready(first)).chain(rest);
        let ctx = RequestContext::from_metadata(String::new(), metadata);
        let mut client = self.upstream.bytestream(&ctx);
        let call = self.upstream.relay_once(
            &ctx,
            UpstreamMethod::ByteStreamPassthrough,
            client.write(self.forwarded(metadata, outbound)),
        );
        tokio::select! {
            result = call => result,
            // A message that does not decode is the client's mistake
            // (INVALID_ARGUMENT); a broken transport UNAVAILABLE.
            Ok(status) = broke_rx => Err(Error::from_client_stream(&status)),
        }
    }

    /// Forwards QueryWriteStatus. It may block upstream (BuildGrid answers
    /// once a reader shows up), so only the client's deadline applies.
    pub async fn query_write_status(
        &self,
        metadata: &MetadataMap,
        message: QueryWriteStatusRequest,
    ) -> Result<QueryWriteStatusResponse> {
        let up = &self.upstream;
        let ctx = RequestContext::from_metadata(String::new(), metadata);
        up.relay(&ctx, UpstreamMethod::ByteStreamPassthrough, || {
            let mut client = up.bytestream(&ctx);
            let request = self.forwarded(metadata, message.clone());
            async move { client.query_write_status(request).await }
        })
        .await
    }

    /// `message` with the client's forwarded headers, the configured ones,
    /// and the client's deadline (if it set one).
    fn forwarded<T>(&self, metadata: &MetadataMap, message: T) -> Request<T> {
        let ctx = RequestContext::from_metadata(String::new(), metadata);
        let mut request = self.upstream.request(&ctx, message);
        if let Some(timeout) = client_timeout(metadata) {
            request.set_timeout(timeout);
        }
        request
    }
}

/// The client's deadline from its `grpc-timeout` header (up to 8 digits and
/// a unit: H, M, S, m, u, n); `None` when absent or malformed.
fn client_timeout(metadata: &MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let split = value.len().checked_sub(1)?;
    let (digits, unit) = (value.get(..split)?, value.get(split..)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeout_of(value: &str) -> Option<Duration> {
        let mut metadata = MetadataMap::new();
        metadata.insert("grpc-timeout", value.parse().unwrap());
        client_timeout(&metadata)
    }

    #[test]
    fn the_clients_grpc_timeout_is_parsed() {
        assert_eq!(timeout_of("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(timeout_of("3M"), Some(Duration::from_secs(180)));
        assert_eq!(timeout_of("59S"), Some(Duration::from_secs(59)));
        assert_eq!(timeout_of("1500m"), Some(Duration::from_millis(1500)));
        assert_eq!(timeout_of("7u"), Some(Duration::from_micros(7)));
        assert_eq!(
            timeout_of("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in ["", "S", "123456789S", "10x", "-1S", "1.5S"] {
            assert_eq!(timeout_of(bad), None, "{bad:?}");
        }
        assert_eq!(client_timeout(&MetadataMap::new()), None);
    }
}
