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
    /// A bug or an unexpected storage failure.
    #[error("internal error: {0}")]
    Internal(String),
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
            Error::Internal(_) => Code::Internal,
        }
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
