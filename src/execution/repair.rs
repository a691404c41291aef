//! MISSING repair: when the upstream refuses an execution because it lacks
//! inputs (FAILED_PRECONDITION with MISSING violations, as a call error or
//! in the final ExecuteResponse), upload those blobs from the local store
//! and execute again, a few rounds at most. BuildGrid refuses a missing
//! Action or Command without naming it: then the Action and Command are
//! uploaded.

use bazel_remote_apis::google::longrunning::Operation;
use tonic::Code;

use crate::context::RequestContext;
use crate::digest::{Digest, DigestFunction};
use crate::reapi::action::{execute_response, missing_blobs, missing_blobs_in_status};
use crate::stats::Stats;
use crate::store::replicator::Replicator;

/// MISSING-input repairs per execution: an upstream may report a lost
/// Directory first and the files below it only after it got the Directory.
const MAX_REPAIRS: u32 = 3;

/// The repair budget of one execution.
pub(super) struct Repairs {
    /// Rounds done so far.
    done: u32,
    /// The Action and Command digests: what to upload when the upstream
    /// refuses with FAILED_PRECONDITION but names no blob.
    essentials: Vec<Digest>,
}

impl Repairs {
    /// No repairs yet; `essentials` are uploaded when nothing is named.
    pub(super) fn new(essentials: Vec<Digest>) -> Self {
        Repairs {
            done: 0,
            essentials,
        }
    }

    /// The blobs a refused Execute call names as missing (the Action and
    /// Command when it is FAILED_PRECONDITION naming none); empty when the
    /// call failed for another reason.
    pub(super) fn named_by_call(
        &self,
        status: &tonic::Status,
        function: DigestFunction,
    ) -> Vec<Digest> {
        if status.code() != Code::FailedPrecondition {
            return Vec::new();
        }
        let missing = missing_blobs_in_status(status, function);
        if missing.is_empty() {
            self.essentials.clone()
        } else {
            missing
        }
    }

    /// The blobs a final Operation names as missing inputs, if it failed so.
    pub(super) fn named_by_result(op: &Operation, function: DigestFunction) -> Option<Vec<Digest>> {
        let status = execute_response(op)?
            .status
            .filter(|s| s.code == Code::FailedPrecondition as i32)?;
        Some(missing_blobs(&status, function))
    }

    /// Uploads blobs the upstream reported missing from the local store
    /// through `replicator`; true if executing again is worth it.
    pub(super) async fn upload(
        &mut self,
        ctx: &RequestContext,
        replicator: &Replicator,
        stats: &Stats,
        missing: Vec<Digest>,
    ) -> bool {
        if self.done >= MAX_REPAIRS || missing.is_empty() {
            return false;
        }
        self.done += 1;
        let wanted = missing.len();
        let failed = replicator.copy(ctx, missing).await;
        let uploaded = wanted - failed.len();
        Stats::add(&stats.missing_input_repairs, 1);
        Stats::add(&stats.repaired_blobs, uploaded as u64);
        tracing::info!(
            "upstream lacked {wanted} input blob(s); uploaded {uploaded} from the local store{}",
            if failed.is_empty() {
                ", executing again"
            } else {
                ""
            }
        );
        uploaded > 0
    }
}
