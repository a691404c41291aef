//! The queue in memory: its entries (with their pins and waiters), the
//! order they go up in, which results wait for which blobs, and the totals
//! the gauges show. Plain data behind the queue's lock: nothing here does
//! I/O or awaits; it says what to send next and what a finished attempt
//! changes (including which durable records to delete).

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};

use bazel_remote_apis::build::bazel::remote::execution::v2::ActionResult;
use tokio::sync::oneshot;

pub use self::take::{Budget, Work};
use super::records;
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::store::local::PinGuard;
use crate::store::{ActionKey, SMALL_BLOB};

/// Attempts an entry the upstream refuses for good gets before it is given up.
pub const REFUSALS: u32 = 3;

mod take;

/// Told when an entry's attempt ends: `Ok` once it is up, or the attempt's error.
pub type Waiter = oneshot::Sender<Result<()>>;

/// Where a blob entry is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    /// Its record is being written; not sent yet.
    Pending,
    /// In one of the queues.
    Waiting,
    /// Being uploaded.
    InFlight,
}

/// One queued blob of one instance name.
struct BlobEntry {
    status: Status,
    /// Flushed: goes in the urgent queues, even while uploads are paused.
    urgent: bool,
    /// Which queue item is current (older items for it are skipped).
    token: u64,
    /// Refusals so far.
    refusals: u32,
    /// Position in the age order.
    age: (u64, u64),
    /// Flushes waiting for it.
    waiters: Vec<Waiter>,
    /// Results that wait for it.
    dependents: HashSet<ActionKey>,
    /// Keeps the blob in the local store until it is up.
    _pin: PinGuard,
}

/// One queued action result.
struct ResultEntry {
    result: ActionResult,
    /// Blobs of its instance still queued, which must go up first.
    waiting_on: HashSet<Digest>,
    /// Bumped when a later result replaces it.
    generation: u64,
    /// An attempt (of this or an earlier generation) is running: a
    /// replacement is not sent until it ends, so the last one wins upstream.
    in_flight: bool,
    refusals: u32,
    age: (u64, u64),
}

/// What a failed attempt leads to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Worth retrying (the upstream is down, a timeout…).
    Transient,
    /// The upstream refused it; retried only [`REFUSALS`] times.
    Refused,
    /// The blob is gone from the local store: nothing to send.
    Lost,
}

/// What a settled blob attempt changed, for the caller to count and log.
#[derive(Debug, Default)]
pub struct Settled {
    /// Durable records to delete.
    pub delete: Vec<Vec<u8>>,
    /// Entries given up (the blob, and the results that waited for it).
    pub given_up: Vec<String>,
}

const URGENT_SMALL: usize = 0;
const URGENT_LARGE: usize = 1;
const SMALL: usize = 2;
const LARGE: usize = 3;

/// The queue's entries and order.
#[derive(Default)]
pub struct State {
    blobs: HashMap<String, HashMap<Digest, BlobEntry>>,
    results: HashMap<ActionKey, ResultEntry>,
    /// Urgent small, urgent large, small, large: (instance, digest, token).
    queues: [VecDeque<(String, Digest, u64)>; 4],
    ready_results: VecDeque<(ActionKey, u64)>,
    /// (queued at in unix ms, sequence) of every entry: the oldest first.
    by_age: BTreeSet<(u64, u64)>,
    blob_count: u64,
    bytes: u64,
    next: u64,
}

impl State {
    fn next(&mut self) -> u64 {
        self.next += 1;
        self.next
    }

    /// Blobs, their bytes and results queued (pending ones included).
    pub fn totals(&self) -> (u64, u64, u64) {
        (self.blob_count, self.bytes, self.results.len() as u64)
    }

    /// When the oldest entry was queued (unix ms).
    pub fn oldest(&self) -> Option<u64> {
        self.by_age.first().map(|&(since, _)| since)
    }

    /// Whether `digest` is queued for `instance`.
    pub fn contains(&self, instance: &str, digest: &Digest) -> bool {
        self.blobs
            .get(instance)
            .is_some_and(|blobs| blobs.contains_key(digest))
    }

    /// Adds a blob whose record is still to be written ([`State::activate`]
    /// puts it in line); `false` if it is queued already.
    pub fn add_pending(
        &mut self,
        instance: &str,
        digest: Digest,
        since: u64,
        pin: PinGuard,
    ) -> bool {
        if self.contains(instance, &digest) {
            return false;
        }
        let age = (since, self.next());
        self.by_age.insert(age);
        self.blob_count += 1;
        self.bytes += digest.size;
        let entry = BlobEntry {
            status: Status::Pending,
            urgent: false,
            token: 0,
            refusals: 0,
            age,
            waiters: Vec::new(),
            dependents: HashSet::new(),
            _pin: pin,
        };
        self.blobs
            .entry(instance.to_string())
            .or_default()
            .insert(digest, entry);
        true
    }

    /// Puts a pending blob in line (its record is written).
    pub fn activate(&mut self, instance: &str, digest: &Digest) {
        self.enqueue(instance, digest, false);
    }

    /// Forgets a pending blob whose record could not be written.
    pub fn abandon(&mut self, instance: &str, digest: &Digest, error: &Error) {
        if let Some(mut entry) = self.remove_blob(instance, digest) {
            for waiter in entry.waiters.drain(..) {
                let _ = waiter.send(Err(error.duplicate()));
            }
        }
    }

    /// Puts a blob in its queue (at the front after a failed attempt).
    fn enqueue(&mut self, instance: &str, digest: &Digest, front: bool) {
        let token = self.next();
        let Some(entry) = self.blobs.get_mut(instance).and_then(|b| b.get_mut(digest)) else {
            return;
        };
        entry.status = Status::Waiting;
        entry.token = token;
        let large = digest.size > SMALL_BLOB;
        let queue = match (entry.urgent, large) {
            (true, false) => URGENT_SMALL,
            (true, true) => URGENT_LARGE,
            (false, false) => SMALL,
            (false, true) => LARGE,
        };
        let item = (instance.to_string(), *digest, token);
        if front {
            self.queues[queue].push_front(item);
        } else {
            self.queues[queue].push_back(item);
        }
    }

    fn remove_blob(&mut self, instance: &str, digest: &Digest) -> Option<BlobEntry> {
        let blobs = self.blobs.get_mut(instance)?;
        let entry = blobs.remove(digest)?;
        if blobs.is_empty() {
            self.blobs.remove(instance);
        }
        self.by_age.remove(&entry.age);
        self.blob_count -= 1;
        self.bytes -= digest.size;
        Some(entry)
    }

    /// Registers a flush of a queued blob: it moves to the urgent queues.
    /// `None` when it is not queued (nothing to wait for).
    pub fn flush(
        &mut self,
        instance: &str,
        digest: &Digest,
    ) -> Option<oneshot::Receiver<Result<()>>> {
        let entry = self.blobs.get_mut(instance)?.get_mut(digest)?;
        let (tx, rx) = oneshot::channel();
        entry.waiters.push(tx);
        if !entry.urgent {
            entry.urgent = true;
            if entry.status == Status::Waiting {
                self.enqueue(instance, digest, false);
            }
        }
        Some(rx)
    }

    /// Queues (or replaces) an action result behind those of `after` still
    /// queued for its instance name.
    pub fn add_result(
        &mut self,
        key: ActionKey,
        result: ActionResult,
        after: &[Digest],
        since: u64,
    ) {
        let seq = self.next();
        let mut in_flight = false;
        let mut age = (since, seq);
        if let Some(old) = self.results.remove(&key) {
            self.unlink(&key, &old.waiting_on);
            in_flight = old.in_flight;
            age = old.age;
        } else {
            self.by_age.insert(age);
        }
        let mut waiting_on = HashSet::new();
        if let Some(blobs) = self.blobs.get_mut(&key.instance) {
            for digest in after {
                if let Some(entry) = blobs.get_mut(digest) {
                    entry.dependents.insert(key.clone());
                    waiting_on.insert(*digest);
                }
            }
        }
        let ready = waiting_on.is_empty() && !in_flight;
        let entry = ResultEntry {
            result,
            waiting_on,
            generation: seq,
            in_flight,
            refusals: 0,
            age,
        };
        self.results.insert(key.clone(), entry);
        if ready {
            self.ready_results.push_back((key, seq));
        }
    }

    fn unlink(&mut self, key: &ActionKey, waiting_on: &HashSet<Digest>) {
        if let Some(blobs) = self.blobs.get_mut(&key.instance) {
            for digest in waiting_on {
                if let Some(entry) = blobs.get_mut(digest) {
                    entry.dependents.remove(key);
                }
            }
        }
    }

    /// A blob is up (or the upstream had it): it leaves, its waiters are
    /// told, and results waiting only for it become ready.
    pub fn blob_done(&mut self, instance: &str, digest: &Digest) -> Vec<Vec<u8>> {
        let Some(entry) = self.remove_blob(instance, digest) else {
            return Vec::new();
        };
        for waiter in entry.waiters {
            let _ = waiter.send(Ok(()));
        }
        for key in entry.dependents {
            if let Some(result) = self.results.get_mut(&key) {
                result.waiting_on.remove(digest);
                if result.waiting_on.is_empty() && !result.in_flight {
                    self.ready_results.push_back((key, result.generation));
                }
            }
        }
        vec![records::blob_key(instance, digest)]
    }

    /// A blob's attempt failed: its waiters get the error; it goes back to
    /// the front of its queue, or is given up with the results that wait
    /// for it (lost locally, or refused [`REFUSALS`] times).
    pub fn blob_failed(
        &mut self,
        instance: &str,
        digest: &Digest,
        error: &Error,
        failure: Failure,
    ) -> Settled {
        let mut settled = Settled::default();
        let Some(entry) = self.blobs.get_mut(instance).and_then(|b| b.get_mut(digest)) else {
            return settled;
        };
        for waiter in entry.waiters.drain(..) {
            let _ = waiter.send(Err(error.duplicate()));
        }
        entry.urgent = false;
        if failure == Failure::Refused {
            entry.refusals += 1;
        }
        if failure == Failure::Transient
            || (failure == Failure::Refused && entry.refusals < REFUSALS)
        {
            self.enqueue(instance, digest, true);
            return settled;
        }
        let entry = self.remove_blob(instance, digest).expect("found above");
        settled.delete.push(records::blob_key(instance, digest));
        settled
            .given_up
            .push(format!("blob {digest} (instance {instance:?})"));
        for key in entry.dependents {
            if let Some(result) = self.results.remove(&key) {
                self.unlink(&key, &result.waiting_on);
                self.by_age.remove(&result.age);
                settled.delete.push(records::result_key(&key));
                settled.given_up.push(format!(
                    "action result {} (instance {:?}), which waited for it",
                    key.action, key.instance
                ));
            }
        }
        settled
    }

    /// A result's attempt ended. `None` = forwarded; `Some(refused)` = failed.
    /// Returns the record to delete when the entry leaves (forwarded, or
    /// refused [`REFUSALS`] times), and whether it was given up.
    pub fn result_settled(
        &mut self,
        key: &ActionKey,
        generation: u64,
        failed: Option<bool>,
    ) -> (Option<Vec<u8>>, bool) {
        let Some(entry) = self.results.get_mut(key) else {
            return (None, false);
        };
        entry.in_flight = false;
        if entry.generation != generation {
            // Replaced while in flight: the replacement goes now.
            if entry.waiting_on.is_empty() {
                self.ready_results
                    .push_back((key.clone(), entry.generation));
            }
            return (None, false);
        }
        let give_up = match failed {
            None => false,
            Some(refused) => {
                entry.refusals += u32::from(refused);
                if !refused || entry.refusals < REFUSALS {
                    self.ready_results.push_front((key.clone(), generation));
                    return (None, false);
                }
                true
            }
        };
        let entry = self.results.remove(key).expect("found above");
        self.by_age.remove(&entry.age);
        (Some(records::result_key(key)), give_up)
    }
}
