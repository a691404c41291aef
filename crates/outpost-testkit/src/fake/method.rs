//! The RPCs the fake serves, by name: the key of the call log, the latency
//! table, the faults and the pause gate.

/// Every RPC the fake serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Method {
    GetCapabilities,
    FindMissingBlobs,
    BatchUpdateBlobs,
    BatchReadBlobs,
    GetTree,
    SplitBlob,
    SpliceBlob,
    GetChunkMapping,
    RegisterChunkMapping,
    Read,
    Write,
    QueryWriteStatus,
    GetActionResult,
    UpdateActionResult,
    Execute,
    WaitExecution,
    GetOperation,
    ListOperations,
    DeleteOperation,
    CancelOperation,
    WaitOperation,
    CreateLogStream,
}

impl Method {
    /// Every method, in declaration order.
    pub const ALL: [Method; 22] = [
        Method::GetCapabilities,
        Method::FindMissingBlobs,
        Method::BatchUpdateBlobs,
        Method::BatchReadBlobs,
        Method::GetTree,
        Method::SplitBlob,
        Method::SpliceBlob,
        Method::GetChunkMapping,
        Method::RegisterChunkMapping,
        Method::Read,
        Method::Write,
        Method::QueryWriteStatus,
        Method::GetActionResult,
        Method::UpdateActionResult,
        Method::Execute,
        Method::WaitExecution,
        Method::GetOperation,
        Method::ListOperations,
        Method::DeleteOperation,
        Method::CancelOperation,
        Method::WaitOperation,
        Method::CreateLogStream,
    ];

    /// The gRPC method name.
    pub fn name(self) -> &'static str {
        match self {
            Method::GetCapabilities => "GetCapabilities",
            Method::FindMissingBlobs => "FindMissingBlobs",
            Method::BatchUpdateBlobs => "BatchUpdateBlobs",
            Method::BatchReadBlobs => "BatchReadBlobs",
            Method::GetTree => "GetTree",
            Method::SplitBlob => "SplitBlob",
            Method::SpliceBlob => "SpliceBlob",
            Method::GetChunkMapping => "GetChunkMapping",
            Method::RegisterChunkMapping => "RegisterChunkMapping",
            Method::Read => "Read",
            Method::Write => "Write",
            Method::QueryWriteStatus => "QueryWriteStatus",
            Method::GetActionResult => "GetActionResult",
            Method::UpdateActionResult => "UpdateActionResult",
            Method::Execute => "Execute",
            Method::WaitExecution => "WaitExecution",
            Method::GetOperation => "GetOperation",
            Method::ListOperations => "ListOperations",
            Method::DeleteOperation => "DeleteOperation",
            Method::CancelOperation => "CancelOperation",
            Method::WaitOperation => "WaitOperation",
            Method::CreateLogStream => "CreateLogStream",
        }
    }

    /// Methods that move blob contents (the "transfers").
    pub fn is_transfer(self) -> bool {
        matches!(
            self,
            Method::BatchReadBlobs | Method::BatchUpdateBlobs | Method::Read | Method::Write
        )
    }
}
