//! One error type for the whole crate, mapped to a gRPC status in one place.
//!
//! Layers raise the variant that says what went wrong; the wire code follows
//! from the variant (see `From<Error> for tonic::Status`), so services never
//! pick status codes by hand.

use tonic::Code;

/// Everything that can go wrong while serving a request.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
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
    /// A bug or an unexpected storage failure.
    #[error("internal error: {0}")]
    Internal(String),
    /// A status from the upstream, relayed to our client exactly as it came
    /// (code, message, details): execution passthrough must not reword it.
    #[error("{0}")]
    Upstream(UpstreamStatus),
}

/// An upstream `tonic::Status` kept whole (boxed: it is large).
#[derive(Clone, Debug)]
pub struct UpstreamStatus(pub Box<tonic::Status>);

impl PartialEq for UpstreamStatus {
    fn eq(&self, other: &Self) -> bool {
        let (a, b) = (&self.0, &other.0);
        a.code() == b.code() && a.message() == b.message() && a.details() == b.details()
    }
}

impl Eq for UpstreamStatus {}

impl std::fmt::Display for UpstreamStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0.message())
    }
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
            Error::Internal(_) => Code::Internal,
            Error::Upstream(status) => status.0.code(),
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
            Code::Unavailable | Code::Cancelled | Code::Aborted | Code::Unknown => {
                Error::Unavailable(msg)
            }
            _ => Error::Internal(msg),
        }
    }

    /// Relays an upstream status unchanged (see [`Error::Upstream`]).
    pub fn relayed(status: tonic::Status) -> Self {
        Error::Upstream(UpstreamStatus(Box::new(status)))
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
        if let Error::Internal(msg) = &err {
            tracing::error!("internal error: {msg}");
        }
        if let Error::Upstream(status) = err {
            return *status.0;
        }
        tonic::Status::new(err.code(), err.to_string())
    }
}

impl From<rocksdb::Error> for Error {
    fn from(err: rocksdb::Error) -> Self {
        Error::Internal(format!("rocksdb: {err}"))
    }
}

impl From<std::io::Error> for Error {
    fn from(err: std::io::Error) -> Self {
        Error::Internal(format!("i/o: {err}"))
    }
}

impl From<prost::DecodeError> for Error {
    fn from(err: prost::DecodeError) -> Self {
        Error::InvalidArgument(format!("cannot decode protobuf message: {err}"))
    }
}
