//! The input check before an execution is forwarded: the upstream must
//! hold the Action, its Command and the whole input tree. A FindMissing
//! through the proxy uploads what only Outpost holds; what is still missing
//! afterwards the upstream reports itself (and [`repair`](super::repair)
//! handles). In write-back mode, inputs still waiting in the upload queue
//! are uploaded first (the FindMissing calls them present).

use crate::context::RequestContext;
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::execution::ExecutionDeps;
use crate::reapi::action::action_inputs;

/// Makes sure the upstream has every input of `action`. Returns the
/// essentials (the Action and, when it could be read, its Command): what to
/// upload when the upstream refuses without naming a blob. Fails only when
/// the blobs are unavailable; any other trouble is left to the upstream.
pub(super) async fn ensure_inputs(
    deps: &ExecutionDeps,
    ctx: &RequestContext,
    action: Digest,
) -> Result<Vec<Digest>> {
    let mut essentials = vec![action];
    let queued = || deps.uploads.as_ref().filter(|q| !q.is_empty());
    // If the upstream confirmed the Action within the existence TTL, the
    // client has just checked its whole input set through us (as Bazel does
    // before every Execute): walking the tree again would only cost round
    // trips. Unless uploads are queued: some of them may be this action's.
    if queued().is_none() && deps.existence.knows(ctx, &action) {
        return Ok(essentials);
    }
    match action_inputs(&*deps.blobs, ctx, &action).await {
        Ok(inputs) => {
            essentials.push(inputs.command);
            if let Err(e) = deps.blobs.find_missing(ctx, &inputs.blobs).await {
                tracing::debug!("input check for {action} failed: {e}");
            }
            // Asked again: the FindMissing may have just queued inputs
            // that only the local store held.
            if let Some(queue) = queued() {
                queue.flush(ctx, &inputs.blobs).await?;
            }
        }
        Err(e @ Error::Unavailable(_)) => return Err(e),
        Err(e) => tracing::debug!("cannot list the inputs of {action}: {e}"),
    }
    Ok(essentials)
}
