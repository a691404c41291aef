//! Helpers for execution passthrough: finding an action's inputs, reading
//! MISSING precondition failures, and decoding finished Operations.

use std::collections::HashSet;

use bazel_remote_apis::build::bazel::remote::execution::v2::{
    Action, Directory, ExecuteOperationMetadata, ExecuteResponse,
};
use bazel_remote_apis::google::longrunning::{Operation, operation};
use bazel_remote_apis::google::rpc;
use prost::Message;

use crate::context::RequestContext;
use crate::digest::{Digest, DigestFunction};
use crate::error::{Error, Result};
use crate::store::{BlobStore, read_to_bytes};

/// `google.rpc.PreconditionFailure` (not in the generated crate).
#[derive(Clone, PartialEq, prost::Message)]
pub struct PreconditionFailure {
    /// What failed.
    #[prost(message, repeated, tag = "1")]
    pub violations: Vec<Violation>,
}

/// One `google.rpc.PreconditionFailure.Violation`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Violation {
    /// For REAPI, `MISSING` for a blob the server lacks.
    #[prost(string, tag = "1")]
    pub r#type: String,
    /// For REAPI, `blobs/{hash}/{size}` (optionally with a digest function).
    #[prost(string, tag = "2")]
    pub subject: String,
    /// Free text.
    #[prost(string, tag = "3")]
    pub description: String,
}

/// The type URL suffix of PreconditionFailure details.
const PRECONDITION_FAILURE: &str = "google.rpc.PreconditionFailure";

/// The blobs a FAILED_PRECONDITION status reports as MISSING.
pub fn missing_blobs(status: &rpc::Status, function: DigestFunction) -> Vec<Digest> {
    let mut out = Vec::new();
    for any in &status.details {
        if !any.type_url.ends_with(PRECONDITION_FAILURE) {
            continue;
        }
        let Ok(failure) = PreconditionFailure::decode(any.value.as_slice()) else {
            continue;
        };
        for v in failure.violations.iter().filter(|v| v.r#type == "MISSING") {
            if let Some(d) = parse_subject(&v.subject, function) {
                out.push(d);
            }
        }
    }
    out
}

/// The same, from a gRPC status (its `grpc-status-details-bin`).
pub fn missing_blobs_in_status(status: &tonic::Status, function: DigestFunction) -> Vec<Digest> {
    match rpc::Status::decode(status.details()) {
        Ok(rpc_status) => missing_blobs(&rpc_status, function),
        Err(_) => Vec::new(),
    }
}

/// Parses `blobs/{hash}/{size}` or `blobs/{function}/{hash}/{size}`.
fn parse_subject(subject: &str, function: DigestFunction) -> Option<Digest> {
    let parts: Vec<&str> = subject.split('/').collect();
    let (hash, size) = match parts.as_slice() {
        ["blobs", hash, size] | ["blobs", _, hash, size] => (*hash, *size),
        _ => return None,
    };
    Digest::parse(function, hash, size.parse().ok()?).ok()
}

/// The ExecuteResponse of a finished Operation, if it carries one.
pub fn execute_response(op: &Operation) -> Option<ExecuteResponse> {
    match &op.result {
        Some(operation::Result::Response(any)) if any.type_url.ends_with("ExecuteResponse") => {
            ExecuteResponse::decode(any.value.as_slice()).ok()
        }
        _ => None,
    }
}

/// The action digest an Operation's metadata names, if any.
pub fn operation_action(op: &Operation, function: DigestFunction) -> Option<Digest> {
    let any = op.metadata.as_ref()?;
    let meta = ExecuteOperationMetadata::decode(any.value.as_slice()).ok()?;
    Digest::from_proto(function, meta.action_digest.as_ref()).ok()
}

/// Reads an Action and lists every blob the upstream needs to run it: the
/// Action, its Command, and the input root's Directory tree and files. The
/// tree is read a level at a time (one batched round trip per level).
pub async fn action_inputs(
    blobs: &dyn BlobStore,
    ctx: &RequestContext,
    action_digest: &Digest,
) -> Result<(Action, Vec<Digest>)> {
    let function = action_digest.function;
    let action = Action::decode(read_to_bytes(blobs, ctx, action_digest).await?)?;
    let mut out = vec![*action_digest];
    out.push(Digest::from_proto(
        function,
        action.command_digest.as_ref(),
    )?);
    let root = Digest::from_proto(function, action.input_root_digest.as_ref())?;
    let mut seen = HashSet::from([root]);
    let mut level = vec![root];
    while !level.is_empty() {
        let reads = blobs.read_many(ctx, &level).await;
        let mut next = Vec::new();
        for (digest, read) in level.iter().zip(reads) {
            out.push(*digest);
            let dir = match read {
                Ok(bytes) => Directory::decode(bytes)?,
                // Neither here nor upstream: the upstream will say so.
                Err(Error::NotFound(_)) => continue,
                Err(e) => return Err(e),
            };
            for file in &dir.files {
                out.push(Digest::from_proto(function, file.digest.as_ref())?);
            }
            for child in &dir.directories {
                let d = Digest::from_proto(function, child.digest.as_ref())?;
                if seen.insert(d) {
                    next.push(d);
                }
            }
        }
        level = next;
    }
    Ok((action, out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bazel_remote_apis::google::protobuf::Any;

    #[test]
    fn reads_missing_violations() {
        let d = Digest::of(DigestFunction::Sha256, b"x");
        let failure = PreconditionFailure {
            violations: vec![
                Violation {
                    r#type: "MISSING".into(),
                    subject: format!("blobs/{}/{}", d.hash_hex(), d.size),
                    description: String::new(),
                },
                Violation {
                    r#type: "OTHER".into(),
                    subject: "whatever".into(),
                    description: String::new(),
                },
                Violation {
                    r#type: "MISSING".into(),
                    subject: format!("blobs/sha256/{}/{}", d.hash_hex(), d.size),
                    description: String::new(),
                },
            ],
        };
        let status = rpc::Status {
            code: 9,
            message: "missing".into(),
            details: vec![Any {
                type_url: "type.googleapis.com/google.rpc.PreconditionFailure".into(),
                value: failure.encode_to_vec(),
            }],
        };
        assert_eq!(missing_blobs(&status, DigestFunction::Sha256), vec![d, d]);
        let grpc = tonic::Status::with_details(
            tonic::Code::FailedPrecondition,
            "missing",
            status.encode_to_vec().into(),
        );
        assert_eq!(
            missing_blobs_in_status(&grpc, DigestFunction::Sha256),
            vec![d, d]
        );
    }
}
