//! One error type for the whole crate, mapped to a gRPC status in one place.
//!
//! Layers raise the variant that says what went wrong; the wire code follows
//! from the variant (see `From<Error> for tonic::Status`), so services never
//! pick status codes by hand.
//!
//! Disk and RocksDB failures keep their source error (`Error::Io`,
//! `Error::RocksDb`), so logs and `std::error::Error::source` see the cause.
//! `Error` is not `Clone`: a failure shared by several waiters (a
//! single-flight, a batched call) is copied for each with
//! [`Error::duplicate`]. Upstream statuses are mapped to the variant that says
//! what they mean here (`from_upstream`), keeping the upstream's message: the
//! variant is what callers match on (an upstream NOT_FOUND is a miss).

use tonic::Code;

/// Everything that can go wrong while serving a request.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed (bad digest, bad resource name, hash mismatch…).
    #[error("{0}")]
    InvalidArgument(String),
    /// The blob, action result or upload does not exist.
    #[error("{0}")]
    NotFound(String),
    /// An offset or limit lies outside the resource.
    #[error("{0}")]
    OutOfRange(String),
    /// The request is valid but the system is not in a state to serve it.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A quota or limit would be exceeded.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The feature exists in the protocol but this server does not offer it.
    #[error("{0}")]
    Unimplemented(String),
    /// A dependency (disk, upstream) is temporarily unavailable.
    #[error("{0}")]
    Unavailable(String),
    /// The caller's credentials were refused (by the upstream).
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller may not do this (says the upstream).
    #[error("{0}")]
    PermissionDenied(String),
    /// A deadline expired before the work finished.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// Stored bytes are corrupt (they no longer hash to their digest): the
    /// entry was removed, a retry fetches it again or reports it missing.
    #[error("{0}")]
    DataLoss(String),
    /// A bug or an unexpected storage failure.
    #[error("internal error: {0}")]
    Internal(String),
    /// A local file operation failed (reported as INTERNAL).
    #[error("internal error: i/o: {0}")]
    Io(#[from] std::io::Error),
    /// RocksDB failed (reported as INTERNAL).
    #[error("internal error: rocksdb: {0}")]
    RocksDb(#[from] rocksdb::Error),
    /// A status from the upstream, relayed to our client exactly as it came
    /// (code, message, details): execution passthrough must not reword it.
    #[error("{0}")]
    Upstream(UpstreamStatus),
    /// A status Outpost builds itself with `google.rpc` details attached
    /// (BadRequest, PreconditionFailure), sent as built: see
    /// [`Error::with_details`].
    #[error("{0}")]
    Detailed(UpstreamStatus),
}

/// A `tonic::Status` kept whole, details included (boxed: it is large).
#[derive(Clone, Debug)]
pub struct UpstreamStatus(pub Box<tonic::Status>);

impl std::fmt::Display for UpstreamStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0.message())
    }
}

/// Client strings echoed in error messages are cut to this many characters,
/// so an error about a huge name stays small enough to deliver.
pub const ECHO_LIMIT: usize = 200;

/// `text` (a client's string) cut to a length fit for an error message.
pub fn clip(text: &str) -> String {
    match text.char_indices().nth(ECHO_LIMIT) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_string(),
    }
}

/// Longest status message (in bytes) Outpost sends: a last resort behind
/// [`clip`], so that no message, whatever it repeats, outgrows the header
/// limits of a client's gRPC stack (8 KiB in gRPC Java and C++; a message
/// is percent-encoded, up to 3 bytes a byte).
pub const MESSAGE_CAP: usize = 1024;

/// `message` cut to at most [`MESSAGE_CAP`] bytes (on a char boundary),
/// marked with an ellipsis when cut.
fn capped(message: &str) -> Option<String> {
    if message.len() <= MESSAGE_CAP {
        return None;
    }
    let mut end = MESSAGE_CAP - '…'.len_utf8();
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    Some(format!("{}…", &message[..end]))
}

/// Whether a status a client's request stream ended with means the
/// transport broke (reset, connection lost) rather than that the client
/// sent something malformed. tonic keeps the transport's error as the
/// status's source; the statuses its decoder makes for a message that does
/// not decode (or is too large) have none.
pub fn broke_in_transit(status: &tonic::Status) -> bool {
    std::error::Error::source(status).is_some()
}

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The gRPC code this error is reported with.
    pub fn code(&self) -> Code {
        match self {
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::OutOfRange(_) => Code::OutOfRange,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::Unimplemented(_) => Code::Unimplemented,
            Error::Unavailable(_) => Code::Unavailable,
            Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Error::DataLoss(_) => Code::DataLoss,
            Error::Internal(_) | Error::Io(_) | Error::RocksDb(_) => Code::Internal,
            Error::Upstream(status) | Error::Detailed(status) => status.0.code(),
        }
    }

    /// An equivalent error (same variant, code and message) for another
    /// waiter on one shared failure. An io error keeps its kind; a RocksDB
    /// error, which cannot be rebuilt, becomes `Internal` with its message.
    pub fn duplicate(&self) -> Error {
        match self {
            Error::InvalidArgument(m) => Error::InvalidArgument(m.clone()),
            Error::NotFound(m) => Error::NotFound(m.clone()),
            Error::OutOfRange(m) => Error::OutOfRange(m.clone()),
            Error::FailedPrecondition(m) => Error::FailedPrecondition(m.clone()),
            Error::ResourceExhausted(m) => Error::ResourceExhausted(m.clone()),
            Error::Unimplemented(m) => Error::Unimplemented(m.clone()),
            Error::Unavailable(m) => Error::Unavailable(m.clone()),
            Error::Unauthenticated(m) => Error::Unauthenticated(m.clone()),
            Error::PermissionDenied(m) => Error::PermissionDenied(m.clone()),
            Error::DeadlineExceeded(m) => Error::DeadlineExceeded(m.clone()),
            Error::DataLoss(m) => Error::DataLoss(m.clone()),
            Error::Internal(m) => Error::Internal(m.clone()),
            Error::Io(e) => Error::Io(std::io::Error::new(e.kind(), e.to_string())),
            Error::RocksDb(e) => Error::Internal(format!("rocksdb: {e}")),
            Error::Upstream(status) => Error::Upstream(status.clone()),
            Error::Detailed(status) => Error::Detailed(status.clone()),
        }
    }

    /// Maps a status from the upstream at `endpoint` to the error reported to
    /// our client, keeping the code where it means the same thing here.
    pub fn from_upstream(endpoint: &str, status: &tonic::Status) -> Self {
        let msg = format!("upstream {endpoint}: {}", status.message());
        if is_timeout(status) {
            // To our client an upstream that does not answer is unavailable.
            return Error::Unavailable(format!("{msg} (no answer within the rpc_timeout)"));
        }
        match status.code() {
            Code::InvalidArgument => Error::InvalidArgument(msg),
            Code::NotFound => Error::NotFound(msg),
            Code::OutOfRange => Error::OutOfRange(msg),
            Code::FailedPrecondition => Error::FailedPrecondition(msg),
            Code::ResourceExhausted => Error::ResourceExhausted(msg),
            Code::Unimplemented => Error::Unimplemented(msg),
            Code::Unauthenticated => Error::Unauthenticated(msg),
            Code::PermissionDenied => Error::PermissionDenied(msg),
            Code::DeadlineExceeded => Error::DeadlineExceeded(msg),
            Code::DataLoss => Error::DataLoss(msg),
            Code::Unavailable | Code::Cancelled | Code::Aborted | Code::Unknown => {
                Error::Unavailable(msg)
            }
            _ => Error::Internal(msg),
        }
    }

    /// The error for a client's request stream that failed mid-call
    /// (`Streaming::message`). A message that does not decode is the
    /// client's mistake: INVALID_ARGUMENT (retrying cannot help), or
    /// OUT_OF_RANGE / RESOURCE_EXHAUSTED for one over the size limits. A
    /// broken transport ([`broke_in_transit`]) is UNAVAILABLE: the client
    /// may resume.
    pub fn from_client_stream(status: &tonic::Status) -> Self {
        let message = clip(status.message());
        if broke_in_transit(status) {
            return Error::Unavailable(format!("the request stream broke: {message}"));
        }
        match status.code() {
            Code::OutOfRange => Error::OutOfRange(message),
            Code::ResourceExhausted => Error::ResourceExhausted(message),
            _ => Error::InvalidArgument(format!("a request message does not decode: {message}")),
        }
    }

    /// Relays an upstream status unchanged (see [`Error::Upstream`]).
    pub fn relayed(status: tonic::Status) -> Self {
        Error::Upstream(UpstreamStatus(Box::new(status)))
    }

    /// An error with `google.rpc` details (e.g. a BadRequest naming the
    /// offending field), which clients that read details can act on.
    pub fn with_details(
        code: Code,
        message: impl Into<String>,
        details: Vec<bazel_remote_apis::google::protobuf::Any>,
    ) -> Self {
        use prost::Message as _;
        let message = message.into();
        let body = bazel_remote_apis::google::rpc::Status {
            code: code as i32,
            message: message.clone(),
            details,
        };
        let status = tonic::Status::with_details(code, message, body.encode_to_vec().into());
        Error::Detailed(UpstreamStatus(Box::new(status)))
    }

    /// The per-entry status used inside Batch* responses.
    pub fn to_rpc_status(&self) -> bazel_remote_apis::google::rpc::Status {
        bazel_remote_apis::google::rpc::Status {
            code: self.code() as i32,
            message: self.to_string(),
            details: Vec::new(),
        }
    }
}

/// The error of a whole call, once for each of the `n` items it carried
/// (a batched call, a shared flight over several keys).
pub fn each_fails<T>(error: &Error, n: usize) -> Vec<Result<T>> {
    std::iter::repeat_with(|| Err(error.duplicate()))
        .take(n)
        .collect()
}

/// A copy of a shared result for another waiter (see [`Error::duplicate`]).
pub fn duplicate<T: Clone>(result: &Result<T>) -> Result<T> {
    match result {
        Ok(value) => Ok(value.clone()),
        Err(e) => Err(e.duplicate()),
    }
}

/// Whether a status means our own deadline for the call expired (tonic
/// reports a client-side timeout as CANCELLED "Timeout expired").
pub fn is_timeout(status: &tonic::Status) -> bool {
    status.code() == Code::DeadlineExceeded
        || (status.code() == Code::Cancelled && status.message().contains("Timeout expired"))
}

/// An OK per-entry status for Batch* responses.
pub fn ok_rpc_status() -> bazel_remote_apis::google::rpc::Status {
    bazel_remote_apis::google::rpc::Status {
        code: Code::Ok as i32,
        message: String::new(),
        details: Vec::new(),
    }
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        if err.code() == Code::Internal {
            tracing::error!("{err}");
        }
        if let Error::Upstream(status) | Error::Detailed(status) = err {
            let status = *status.0;
            return match capped(status.message()) {
                None => status,
                Some(message) => tonic::Status::with_details_and_metadata(
                    status.code(),
                    message,
                    status.details().to_vec().into(),
                    status.metadata().clone(),
                ),
            };
        }
        let message = err.to_string();
        let message = capped(&message).unwrap_or(message);
        tonic::Status::new(err.code(), message)
    }
}

impl From<prost::DecodeError> for Error {
    fn from(err: prost::DecodeError) -> Self {
        Error::InvalidArgument(format!("cannot decode protobuf message: {err}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_keep_their_source_and_read_as_before() {
        let err = Error::from(std::io::Error::other("disk on fire"));
        assert_eq!(err.to_string(), "internal error: i/o: disk on fire");
        assert_eq!(err.code(), Code::Internal);
        assert!(std::error::Error::source(&err).is_some());
    }

    #[test]
    fn long_client_strings_are_clipped() {
        let long = "x".repeat(1000);
        assert_eq!(clip(&long).chars().count(), ECHO_LIMIT + 1);
        assert_eq!(clip("short"), "short");
    }

    #[test]
    fn status_messages_are_capped_on_a_char_boundary() {
        // "é" is 2 bytes: a cut at an odd byte would split one.
        let long = format!("x{}", "é".repeat(5000));
        for err in [
            Error::InvalidArgument(long.clone()),
            Error::Internal(long.clone()),
            Error::relayed(tonic::Status::not_found(long.clone())),
        ] {
            let code = err.code();
            let status = tonic::Status::from(err);
            assert_eq!(status.code(), code);
            assert!(
                status.message().len() <= MESSAGE_CAP,
                "{}",
                status.message().len()
            );
            assert!(status.message().ends_with('…'));
        }
        let short = tonic::Status::from(Error::NotFound("gone".into()));
        assert_eq!(short.message(), "gone");
    }

    #[test]
    fn a_capped_relayed_status_keeps_its_details() {
        let status = tonic::Status::with_details(
            Code::FailedPrecondition,
            "m".repeat(10_000),
            bytes::Bytes::from_static(b"details"),
        );
        let status = tonic::Status::from(Error::relayed(status));
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(status.details(), b"details");
        assert!(status.message().len() <= MESSAGE_CAP);
    }

    #[test]
    fn a_message_that_does_not_decode_is_the_clients_mistake() {
        let decode = tonic::Status::internal("failed to decode Protobuf message: invalid varint");
        let err = Error::from_client_stream(&decode);
        assert_eq!(err.code(), Code::InvalidArgument);
        let too_big = tonic::Status::out_of_range("decoded message length too large");
        assert_eq!(Error::from_client_stream(&too_big).code(), Code::OutOfRange);
        // A transport failure carries its cause as the source.
        let mut broken = tonic::Status::internal("h2 protocol error: connection reset");
        broken.set_source(std::sync::Arc::new(std::io::Error::other("reset")));
        assert!(broke_in_transit(&broken));
        assert_eq!(Error::from_client_stream(&broken).code(), Code::Unavailable);
    }

    #[test]
    fn a_duplicate_has_the_same_code_and_message() {
        let errors = [
            Error::NotFound("gone".into()),
            Error::Unavailable("down".into()),
            Error::DataLoss("rotten".into()),
            Error::from(std::io::Error::new(std::io::ErrorKind::NotFound, "x")),
        ];
        for err in errors {
            let copy = err.duplicate();
            assert_eq!(
                (copy.code(), copy.to_string()),
                (err.code(), err.to_string())
            );
        }
    }
}
