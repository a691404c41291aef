//! The upstream RPC methods that per-method counters are kept for.

/// Upstream RPC methods, for per-method counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamMethod {
    /// ContentAddressableStorage.FindMissingBlobs
    FindMissingBlobs,
    /// ContentAddressableStorage.BatchReadBlobs
    BatchReadBlobs,
    /// ContentAddressableStorage.BatchUpdateBlobs
    BatchUpdateBlobs,
    /// ByteStream.Read
    ByteStreamRead,
    /// ByteStream.Write
    ByteStreamWrite,
    /// ActionCache.GetActionResult
    GetActionResult,
    /// ActionCache.UpdateActionResult
    UpdateActionResult,
    /// Capabilities.GetCapabilities
    GetCapabilities,
    /// Execution.Execute
    Execute,
    /// Execution.WaitExecution
    WaitExecution,
    /// google.longrunning.Operations (any method)
    Operations,
    /// Remote Asset Fetch.FetchBlob
    FetchBlob,
    /// Remote Asset Fetch.FetchDirectory
    FetchDirectory,
    /// Remote Asset Push.PushBlob
    PushBlob,
    /// Remote Asset Push.PushDirectory
    PushDirectory,
    /// Remote Logstream LogStreamService.CreateLogStream
    CreateLogStream,
    /// ByteStream Read, Write or QueryWriteStatus of a non-CAS resource
    /// (log streams), passed through unchanged
    ByteStreamPassthrough,
}

impl UpstreamMethod {
    /// Every method, in counter order (the order of the enum).
    pub const ALL: [UpstreamMethod; 17] = [
        UpstreamMethod::FindMissingBlobs,
        UpstreamMethod::BatchReadBlobs,
        UpstreamMethod::BatchUpdateBlobs,
        UpstreamMethod::ByteStreamRead,
        UpstreamMethod::ByteStreamWrite,
        UpstreamMethod::GetActionResult,
        UpstreamMethod::UpdateActionResult,
        UpstreamMethod::GetCapabilities,
        UpstreamMethod::Execute,
        UpstreamMethod::WaitExecution,
        UpstreamMethod::Operations,
        UpstreamMethod::FetchBlob,
        UpstreamMethod::FetchDirectory,
        UpstreamMethod::PushBlob,
        UpstreamMethod::PushDirectory,
        UpstreamMethod::CreateLogStream,
        UpstreamMethod::ByteStreamPassthrough,
    ];

    /// The gRPC method name (the `method` label of per-method metrics).
    pub fn name(self) -> &'static str {
        match self {
            UpstreamMethod::FindMissingBlobs => "FindMissingBlobs",
            UpstreamMethod::BatchReadBlobs => "BatchReadBlobs",
            UpstreamMethod::BatchUpdateBlobs => "BatchUpdateBlobs",
            UpstreamMethod::ByteStreamRead => "ByteStream.Read",
            UpstreamMethod::ByteStreamWrite => "ByteStream.Write",
            UpstreamMethod::GetActionResult => "GetActionResult",
            UpstreamMethod::UpdateActionResult => "UpdateActionResult",
            UpstreamMethod::GetCapabilities => "GetCapabilities",
            UpstreamMethod::Execute => "Execute",
            UpstreamMethod::WaitExecution => "WaitExecution",
            UpstreamMethod::Operations => "Operations",
            UpstreamMethod::FetchBlob => "FetchBlob",
            UpstreamMethod::FetchDirectory => "FetchDirectory",
            UpstreamMethod::PushBlob => "PushBlob",
            UpstreamMethod::PushDirectory => "PushDirectory",
            UpstreamMethod::CreateLogStream => "CreateLogStream",
            UpstreamMethod::ByteStreamPassthrough => "ByteStream.passthrough",
        }
    }

    /// Position in [`UpstreamMethod::ALL`] and in per-method counter arrays.
    pub(super) fn index(self) -> usize {
        self as usize
    }
}
