//! Reading Actions, ActionResults and Operations: which blobs an action
//! needs, which blobs a result references, which blobs a failed execution
//! reports MISSING. Pure REAPI knowledge, shared by the action cache,
//! execution and prefetch.

use bazel_remote_apis::build::bazel::remote::execution::v2::{
    Action, ActionResult, ExecuteOperationMetadata, ExecuteResponse, Tree,
};
use bazel_remote_apis::google::longrunning::{Operation, operation};
use bazel_remote_apis::google::rpc;
use prost::Message;

use crate::context::RequestContext;
use crate::digest::{Digest, DigestFunction};
use crate::error::{Error, Result, clip};
use crate::reapi::tree::{IfMissing, push_files, tree_blobs};
use crate::store::{BlobStore, read_to_bytes};

/// What the upstream needs to run an action.
#[derive(Debug)]
pub struct ActionInputs {
    /// The Command's digest: with the Action, what to upload when an
    /// upstream refuses an execution without naming what it lacks.
    pub command: Digest,
    /// Every blob: the Action, its Command, then the input root's
    /// Directories and files.
    pub blobs: Vec<Digest>,
}

/// Reads an Action and lists every blob the upstream needs to run it. The
/// input tree is read a level at a time; a Directory the store lacks is
/// listed all the same (the upstream will report it).
pub async fn action_inputs(
    blobs: &dyn BlobStore,
    ctx: &RequestContext,
    action_digest: &Digest,
) -> Result<ActionInputs> {
    let function = action_digest.function;
    let action = Action::decode(read_to_bytes(blobs, ctx, action_digest).await?)?;
    let command = Digest::from_proto(function, action.command_digest.as_ref())?;
    let root = Digest::from_proto(function, action.input_root_digest.as_ref())?;
    let mut out = vec![*action_digest, command];
    out.extend(tree_blobs(blobs, ctx, [root], IfMissing::List).await?);
    Ok(ActionInputs {
        command,
        blobs: out,
    })
}

/// Every blob an ActionResult references: output files, stdout/stderr, each
/// output directory's Tree and its files, and `root_directory_digest`
/// hierarchies. Err(NotFound) if a Tree or Directory itself is missing.
pub async fn referenced_blobs<B: BlobStore + ?Sized>(
    blobs: &B,
    ctx: &RequestContext,
    function: DigestFunction,
    result: &ActionResult,
) -> Result<Vec<Digest>> {
    let parse = |d| Digest::from_proto(function, Some(d));
    let mut out = named_blobs(function, result)?;
    let dirs = &result.output_directories;
    let trees = dirs
        .iter()
        .filter_map(|d| d.tree_digest.as_ref())
        .map(parse)
        .collect::<Result<Vec<_>>>()?;
    if !trees.is_empty() {
        for read in blobs.read_many(ctx, &trees).await {
            let tree = Tree::decode(read?)?;
            for directory in tree.root.iter().chain(tree.children.iter()) {
                push_files(function, directory, &mut out)?;
            }
        }
    }
    let roots = dirs
        .iter()
        .filter_map(|d| d.root_directory_digest.as_ref())
        .map(parse)
        .collect::<Result<Vec<_>>>()?;
    out.extend(tree_blobs(blobs, ctx, roots, IfMissing::Fail).await?);
    Ok(out)
}

/// The blobs an ActionResult names itself: output files, stdout/stderr and
/// output directories' Trees (what [`referenced_blobs`] lists without
/// reading anything). The Trees' contents are not included.
pub fn named_blobs(function: DigestFunction, result: &ActionResult) -> Result<Vec<Digest>> {
    let parse = |d| Digest::from_proto(function, Some(d));
    let mut out = Vec::new();
    for file in &result.output_files {
        out.push(Digest::from_proto(function, file.digest.as_ref())?);
    }
    for digest in [&result.stdout_digest, &result.stderr_digest]
        .into_iter()
        .flatten()
    {
        out.push(parse(digest)?);
    }
    for dir in &result.output_directories {
        if let Some(tree) = &dir.tree_digest {
            out.push(parse(tree)?);
        }
    }
    Ok(out)
}

/// Checks that every digest an ActionResult carries is well formed, so that
/// a stored result can always be checked and served.
pub fn check_digests(function: DigestFunction, result: &ActionResult) -> Result<()> {
    for file in &result.output_files {
        Digest::from_proto(function, file.digest.as_ref()).map_err(|e| {
            Error::InvalidArgument(format!("output file {:?}: {e}", clip(&file.path)))
        })?;
    }
    for digest in [&result.stdout_digest, &result.stderr_digest]
        .into_iter()
        .flatten()
    {
        Digest::from_proto(function, Some(digest))?;
    }
    for dir in &result.output_directories {
        if dir.tree_digest.is_none() && dir.root_directory_digest.is_none() {
            return Err(Error::InvalidArgument(format!(
                "output directory {:?} has neither tree_digest nor root_directory_digest",
                clip(&dir.path)
            )));
        }
        for digest in [&dir.tree_digest, &dir.root_directory_digest]
            .into_iter()
            .flatten()
        {
            Digest::from_proto(function, Some(digest))?;
        }
    }
    Ok(())
}

/// Drops inlined contents before a result is stored: they live in the CAS
/// under their digests, and the cache should not hold them twice.
pub fn strip_inlined(result: &mut ActionResult) {
    result.stdout_raw.clear();
    result.stderr_raw.clear();
    for file in &mut result.output_files {
        file.contents.clear();
    }
}

/// `google.rpc.PreconditionFailure` (not in the generated crate): how an
/// upstream names the blobs it lacks.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::{MemoryStore, count};
    use bazel_remote_apis::build::bazel::remote::execution::v2::{
        Directory, DirectoryNode, FileNode, OutputDirectory, OutputFile,
    };
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

    fn file(name: &str, d: Digest) -> FileNode {
        FileNode {
            name: name.into(),
            digest: Some(d.to_proto()),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn lists_inputs_and_referenced_blobs() {
        let store = MemoryStore::default();
        let ctx = RequestContext::default();
        let input = store.insert(b"input");
        let sub = store.insert(
            &Directory {
                files: vec![file("in", input)],
                ..Default::default()
            }
            .encode_to_vec(),
        );
        let root = store.insert(
            &Directory {
                directories: vec![DirectoryNode {
                    name: "sub".into(),
                    digest: Some(sub.to_proto()),
                }],
                ..Default::default()
            }
            .encode_to_vec(),
        );
        let command = store.insert(b"command");
        let action = store.insert(
            &Action {
                command_digest: Some(command.to_proto()),
                input_root_digest: Some(root.to_proto()),
                ..Default::default()
            }
            .encode_to_vec(),
        );
        let inputs = action_inputs(&store, &ctx, &action).await.unwrap();
        assert_eq!(inputs.command, command);
        assert_eq!(inputs.blobs, vec![action, command, root, sub, input]);

        let out = store.insert(b"out");
        let tree = store.insert(
            &Tree {
                root: Some(Directory {
                    files: vec![file("o", out)],
                    ..Default::default()
                }),
                children: Vec::new(),
            }
            .encode_to_vec(),
        );
        let result = ActionResult {
            output_files: vec![OutputFile {
                path: "o".into(),
                digest: Some(out.to_proto()),
                ..Default::default()
            }],
            output_directories: vec![
                OutputDirectory {
                    path: "t".into(),
                    tree_digest: Some(tree.to_proto()),
                    ..Default::default()
                },
                OutputDirectory {
                    path: "r".into(),
                    root_directory_digest: Some(root.to_proto()),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let reads_before = count(&store.read_many_calls);
        let blobs = referenced_blobs(&store, &ctx, DigestFunction::Sha256, &result)
            .await
            .unwrap();
        assert_eq!(blobs, vec![out, tree, out, root, sub, input]);
        assert_eq!(
            count(&store.read_many_calls) - reads_before,
            3,
            "one read for the Trees, one per Directory level"
        );
        store.blobs.lock().unwrap().remove(&sub);
        let missing = referenced_blobs(&store, &ctx, DigestFunction::Sha256, &result).await;
        assert!(matches!(missing, Err(Error::NotFound(_))), "{missing:?}");
    }
}
