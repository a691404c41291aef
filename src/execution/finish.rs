//! What happens when an execution finishes well: its outputs are queued for
//! prefetch (the client is about to download them) and a cacheable result
//! (exit code 0, `do_not_cache` unset) is stored in the local action cache.

use bazel_remote_apis::build::bazel::remote::execution::v2::Action;
use bazel_remote_apis::google::longrunning::Operation;
use prost::Message;

use crate::digest::Digest;
use crate::execution::forward::Forwarder;
use crate::reapi::action::{execute_response, operation_action, strip_inlined};
use crate::store::{ActionKey, read_to_bytes};

impl Forwarder {
    /// Caches a successful result locally and queues its outputs for prefetch.
    pub(super) async fn finished(&self, op: &Operation) {
        let Some(response) = execute_response(op) else {
            return;
        };
        if response.status.as_ref().is_some_and(|s| s.code != 0) {
            return;
        }
        let Some(mut result) = response.result else {
            return;
        };
        if self.request.is_none() {
            // WaitExecution names no instance: the outputs' instance (and so
            // the cache key) is unknown here; the client pulls on demand.
            return;
        }
        if let Some(prefetcher) = &self.deps.prefetcher {
            prefetcher.submit(&self.ctx, self.function, &result);
        }
        let Some(action) = self.action.or_else(|| operation_action(op, self.function)) else {
            return;
        };
        if result.exit_code != 0 || !self.cacheable(&action).await {
            return;
        }
        strip_inlined(&mut result);
        let key = ActionKey {
            instance: self.ctx.instance.clone(),
            action,
        };
        if let Err(e) = self
            .deps
            .local_results
            .put_action_result(&self.ctx, &key, &result)
            .await
        {
            tracing::debug!("cannot cache the result of {action} locally: {e}");
        }
    }

    /// Whether the Action allows caching its result (`do_not_cache` unset).
    async fn cacheable(&self, action: &Digest) -> bool {
        match read_to_bytes(&*self.deps.blobs, &self.ctx, action).await {
            Ok(bytes) => Action::decode(bytes).is_ok_and(|a| !a.do_not_cache),
            Err(_) => false,
        }
    }
}
