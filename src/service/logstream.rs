//! Remote Logstream `LogStreamService`: CreateLogStream, forwarded to the
//! logstream endpoint (reads and writes of the stream go through ByteStream,
//! see [`crate::upstream::passthrough`]).

use std::sync::Arc;

use bazel_remote_apis::build::bazel::remote::logstream::v1::{
    CreateLogStreamRequest, LogStream, log_stream_service_server::LogStreamService as LogStreamApi,
};
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::upstream::passthrough::Passthrough;

/// Serves CreateLogStream through the passthrough; without an upstream
/// there is nobody to host a stream and it answers UNIMPLEMENTED.
pub struct LogStreamService {
    passthrough: Option<Arc<Passthrough>>,
}

impl LogStreamService {
    /// A service forwarding to `passthrough` (`None`: standalone).
    pub fn new(passthrough: Option<Arc<Passthrough>>) -> Self {
        LogStreamService { passthrough }
    }
}

#[tonic::async_trait]
impl LogStreamApi for LogStreamService {
    async fn create_log_stream(
        &self,
        request: Request<CreateLogStreamRequest>,
    ) -> Result<Response<LogStream>, Status> {
        let Some(passthrough) = &self.passthrough else {
            return Err(Error::Unimplemented(
                "this Outpost has no upstream to host log streams".into(),
            )
            .into());
        };
        let (metadata, _, message) = request.into_parts();
        Ok(Response::new(
            passthrough.create_log_stream(&metadata, message).await?,
        ))
    }
}
