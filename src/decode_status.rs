//! A request that does not decode is the client's mistake.
//!
//! tonic decodes a unary (or server-streaming) call's request before any
//! handler runs, and answers a body it cannot read — garbage bytes, a
//! truncated frame, no message at all, a bad compression flag — with
//! INTERNAL. Clients take INTERNAL for the server's fault, and the codec is
//! fixed by the generated services, so [`layer`] (on every listener, see
//! `server.rs`) rewrites exactly those answers to INVALID_ARGUMENT.
//!
//! Only a trailers-only answer (the status in the response headers, as
//! tonic sends a failure before any message) with tonic's decoder wording
//! is touched. Client-streaming calls (ByteStream Write) decode in the
//! handler, which maps the failure itself (`Error::from_client_stream`).

use tonic::codegen::http::Response;
use tonic::{Code, Status};
use tower::util::MapResponseLayer;

use crate::error::clip;

/// How tonic's decoder starts the messages of the failures it reports as
/// INTERNAL for a request body (prost's decode error, tonic's framing).
const DECODER_MESSAGES: &[&str] = &[
    "failed to decode Protobuf message",
    "Unexpected EOF decoding stream",
    "Missing request message",
    "protocol error: received message with",
    "Error decompressing",
];

/// The response rewriter as a tower function pointer.
pub type Rewrite = fn(Response<tonic::body::Body>) -> Response<tonic::body::Body>;

/// The layer for `Server::builder().layer(..)`.
pub fn layer() -> MapResponseLayer<Rewrite> {
    MapResponseLayer::new(rewrite as Rewrite)
}

/// `response`, with tonic's INTERNAL for a request that does not decode
/// turned into INVALID_ARGUMENT; any other response unchanged.
pub fn rewrite<B>(mut response: Response<B>) -> Response<B> {
    let headers = response.headers_mut();
    let internal = Code::Internal as i32;
    if headers.get(Status::GRPC_STATUS).map(|v| v.as_bytes())
        != Some(internal.to_string().as_bytes())
    {
        return response;
    }
    let Some(status) = Status::from_header_map(headers) else {
        return response;
    };
    if !DECODER_MESSAGES
        .iter()
        .any(|m| status.message().starts_with(m))
    {
        return response;
    }
    let status = Status::invalid_argument(format!(
        "the request message does not decode: {}",
        clip(status.message())
    ));
    if status.add_header(headers).is_err() {
        tracing::warn!("could not rewrite a decode failure's status");
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: Status) -> Status {
        let response = rewrite(status.into_http::<()>());
        Status::from_header_map(response.headers()).expect("a status")
    }

    #[test]
    fn a_request_that_does_not_decode_is_an_invalid_argument() {
        for message in [
            "failed to decode Protobuf message: invalid wire type value: 7",
            "Unexpected EOF decoding stream.",
            "Missing request message.",
        ] {
            let status = answer(Status::internal(message));
            assert_eq!(status.code(), Code::InvalidArgument, "{message}");
            assert!(status.message().contains(message), "{}", status.message());
        }
    }

    #[test]
    fn other_statuses_pass_unchanged() {
        for status in [
            Status::internal("internal error: i/o: disk on fire"),
            Status::not_found("failed to decode Protobuf message"),
            Status::unavailable("upstream down"),
        ] {
            let (code, message) = (status.code(), status.message().to_string());
            let after = answer(status);
            assert_eq!((after.code(), after.message()), (code, message.as_str()));
        }
        let ok = rewrite(Response::new(()));
        assert!(ok.headers().get(Status::GRPC_STATUS).is_none());
    }
}
