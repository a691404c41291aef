//! What the uploader takes next: flushed blobs first (even while uploads
//! are paused), then results whose blobs are up, large blobs (streamed, a
//! few at a time) and small ones (batched per instance name), within the
//! limits on what is in flight.

use bazel_remote_apis::build::bazel::remote::execution::v2::ActionResult;

use super::{LARGE, SMALL, State, Status, URGENT_LARGE, URGENT_SMALL};
use crate::digest::Digest;
use crate::store::ActionKey;

/// Bytes of small blobs being uploaded at once (they are read into memory).
pub const SMALL_BYTES_IN_FLIGHT: u64 = 64 << 20;
/// Bytes of small blobs in one batched upload.
pub const BATCH_BYTES: u64 = 16 << 20;
/// Large blobs streamed at once.
pub const LARGE_IN_FLIGHT: usize = 4;
/// Action results forwarded at once.
pub const RESULTS_IN_FLIGHT: usize = 16;

/// A unit of upload work, taken by the uploader.
#[derive(Debug)]
pub enum Work {
    /// Small blobs of one instance name, in one batched write.
    Small {
        instance: String,
        digests: Vec<Digest>,
        bytes: u64,
    },
    /// One large blob, streamed.
    Large { instance: String, digest: Digest },
    /// One action result.
    Result {
        key: ActionKey,
        generation: u64,
        result: Box<ActionResult>,
    },
}

/// What is in flight, against the limits.
#[derive(Debug, Default)]
pub struct Budget {
    small_bytes: u64,
    large: usize,
    results: usize,
}

impl Budget {
    /// Gives back what a finished unit held.
    pub fn release(&mut self, work: &Work) {
        match work {
            Work::Small { bytes, .. } => self.small_bytes -= bytes,
            Work::Large { .. } => self.large -= 1,
            Work::Result { .. } => self.results -= 1,
        }
    }
}

impl State {
    /// The next units to send within `budget`: flushed blobs first (even
    /// while `paused`), then, unless paused, results, large and small blobs.
    pub fn take_work(&mut self, budget: &mut Budget, paused: bool) -> Vec<Work> {
        let mut out = Vec::new();
        self.take_large(URGENT_LARGE, budget, &mut out);
        self.take_small(URGENT_SMALL, budget, &mut out);
        if paused {
            return out;
        }
        while budget.results < RESULTS_IN_FLIGHT {
            let Some((key, generation)) = self.ready_results.pop_front() else {
                break;
            };
            let Some(entry) = self.results.get_mut(&key) else {
                continue;
            };
            if entry.generation != generation || entry.in_flight || !entry.waiting_on.is_empty() {
                continue;
            }
            entry.in_flight = true;
            budget.results += 1;
            let result = Box::new(entry.result.clone());
            out.push(Work::Result {
                key,
                generation,
                result,
            });
        }
        self.take_large(LARGE, budget, &mut out);
        self.take_small(SMALL, budget, &mut out);
        out
    }

    /// Pops the next current item of a queue, marking its entry in flight,
    /// if `fits` its size.
    fn pop(&mut self, queue: usize, fits: impl Fn(u64) -> bool) -> Option<(String, Digest)> {
        loop {
            let (instance, digest, token) = self.queues[queue].front()?.clone();
            let current = self
                .blobs
                .get_mut(&instance)
                .and_then(|b| b.get_mut(&digest))
                .filter(|e| e.status == Status::Waiting && e.token == token);
            match current {
                None => {
                    self.queues[queue].pop_front();
                }
                Some(_) if !fits(digest.size) => return None,
                Some(entry) => {
                    entry.status = Status::InFlight;
                    self.queues[queue].pop_front();
                    return Some((instance, digest));
                }
            }
        }
    }

    fn take_large(&mut self, queue: usize, budget: &mut Budget, out: &mut Vec<Work>) {
        while budget.large < LARGE_IN_FLIGHT {
            let Some((instance, digest)) = self.pop(queue, |_| true) else {
                return;
            };
            budget.large += 1;
            out.push(Work::Large { instance, digest });
        }
    }

    fn take_small(&mut self, queue: usize, budget: &mut Budget, out: &mut Vec<Work>) {
        let mut batches: Vec<(String, Vec<Digest>, u64)> = Vec::new();
        loop {
            let used = budget.small_bytes;
            let fits = |size| used == 0 || used + size <= SMALL_BYTES_IN_FLIGHT;
            let Some((instance, digest)) = self.pop(queue, fits) else {
                break;
            };
            budget.small_bytes += digest.size;
            let open = batches
                .iter_mut()
                .position(|(i, _, bytes)| *i == instance && *bytes + digest.size <= BATCH_BYTES);
            match open {
                Some(at) => {
                    batches[at].1.push(digest);
                    batches[at].2 += digest.size;
                }
                None => batches.push((instance, vec![digest], digest.size)),
            }
        }
        out.extend(
            batches
                .into_iter()
                .map(|(instance, digests, bytes)| Work::Small {
                    instance,
                    digests,
                    bytes,
                }),
        );
    }
}
