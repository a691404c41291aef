//! MISSING repair: when the upstream refuses an execution because it lacks
//! inputs (FAILED_PRECONDITION with MISSING violations, as a call error or
//! in the final ExecuteResponse), upload those blobs from the local store
//! and execute again, a few rounds at most. BuildGrid refuses a missing
//! Action or Command without naming it: then the Action and Command are
//! uploaded.

use bazel_remote_apis::google::longrunning::Operation;
use tonic::{Code, Streaming};

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::execution::forward::Forwarder;
use crate::reapi::action::{execute_response, missing_blobs, missing_blobs_in_status};
use crate::stats::Stats;

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
}

impl Forwarder {
    /// Opens Execute, repairing MISSING inputs while the call fails so and
    /// each round has something to upload.
    pub(super) async fn open_execute(&mut self) -> Result<Streaming<Operation>> {
        loop {
            match self.open(None).await {
                Err(Error::Upstream(status)) if status.0.code() == Code::FailedPrecondition => {
                    let mut missing = missing_blobs_in_status(&status.0, self.function);
                    if missing.is_empty() {
                        missing = self.repairs.essentials.clone();
                    }
                    if !self.repair(missing).await {
                        return Err(Error::Upstream(status));
                    }
                }
                other => return other,
            }
        }
    }

    /// For a final Operation that failed with MISSING inputs: repair and
    /// execute again. `None` when there is nothing to retry.
    pub(super) async fn retry_if_missing(
        &mut self,
        op: &Operation,
    ) -> Option<Result<Streaming<Operation>>> {
        let response = execute_response(op)?;
        let status = response
            .status
            .filter(|s| s.code == Code::FailedPrecondition as i32)?;
        let missing = missing_blobs(&status, self.function);
        if !self.repair(missing).await {
            return None;
        }
        Some(self.open_execute().await)
    }

    /// Uploads blobs the upstream reported missing; true if worth retrying.
    async fn repair(&mut self, missing: Vec<Digest>) -> bool {
        if self.repairs.done >= MAX_REPAIRS || self.request.is_none() || missing.is_empty() {
            return false;
        }
        self.repairs.done += 1;
        let wanted = missing.len();
        let failed = self.deps.uploader.copy(&self.ctx, missing).await;
        let uploaded = wanted - failed.len();
        Stats::add(&self.deps.stats.missing_input_repairs, 1);
        Stats::add(&self.deps.stats.repaired_blobs, uploaded as u64);
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
