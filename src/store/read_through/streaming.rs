//! Readers stream a large read-through fetch while it runs.
//!
//! A flight that streams one large blob into the local store registers a
//! [`StreamingFlight`] when it is claimed (before other claims can see the
//! flight, so every reader that joins finds it), and publishes its local
//! writer's [`WriteFollower`] once the writer is open. Every reader of the
//! blob, the one that started the fetch and those that join, then streams
//! the bytes of its range from the follower as they are written
//! ([`follow`]): the blob is fetched and written once, and read back from
//! the writer's file, with no copy of the blob in memory.
//!
//! The bytes are unverified until the writer commits, so a reader holds
//! back the chunk that ends its range until the flight has ended: a
//! verified commit lets it through; a failure (a hash mismatch, a broken
//! upstream stream) replaces it with the flight's error, for every reader.
//! A flight whose writer cannot be followed (a blob buffered in memory, one
//! stored meanwhile) ends without publishing one; its readers then read the
//! stored blob, as do readers that find no flight registered (it ended).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use futures::stream;
use tokio::sync::watch;

use crate::digest::Digest;
use crate::error::{Error, Result, duplicate};
use crate::store::{ChunkStream, WriteFollower};

/// Most bytes a reader takes from the follower in one chunk.
const FOLLOW_CHUNK: u64 = 1 << 20;

/// Streaming flights in progress, by digest.
pub(super) type StreamingFlights = Arc<Mutex<HashMap<Digest, watch::Receiver<Stage>>>>;

/// Where a streaming flight is.
pub(super) enum Stage {
    /// Its local writer is not open yet (the flight waits for its turn, or
    /// for the upstream's answer).
    Starting,
    /// Its writer takes the bytes; readers follow it.
    Writing(WriteFollower),
    /// It ended: the blob is stored, verified, or the fetch failed.
    Ended(Result<()>),
}

/// A streaming flight's entry in the table, removed when the flight ends
/// however it ends; readers that still wait then see the channel closed.
pub(super) struct StreamingFlight {
    /// The table it is entered in.
    table: StreamingFlights,
    /// The blob it fetches.
    digest: Digest,
    /// Tells readers its stage.
    stage: watch::Sender<Stage>,
}

impl StreamingFlight {
    /// Enters a flight fetching `digest` in `table`.
    pub(super) fn register(table: &StreamingFlights, digest: Digest) -> Self {
        let (stage, seen) = watch::channel(Stage::Starting);
        lock(table).insert(digest, seen);
        StreamingFlight {
            table: table.clone(),
            digest,
            stage,
        }
    }

    /// Offers readers the writer's `follower`, if it has one.
    pub(super) fn publish(&self, follower: Option<WriteFollower>) {
        if let Some(follower) = follower {
            self.stage.send_replace(Stage::Writing(follower));
        }
    }

    /// Tells readers how the fetch ended.
    pub(super) fn end(&self, outcome: &Result<()>) {
        self.stage.send_replace(Stage::Ended(duplicate(outcome)));
    }
}

impl Drop for StreamingFlight {
    fn drop(&mut self) {
        let mut table = lock(&self.table);
        if table
            .get(&self.digest)
            .is_some_and(|seen| seen.same_channel(&self.stage.subscribe()))
        {
            table.remove(&self.digest);
        }
    }
}

/// The streaming flight fetching `digest`, if one is in progress.
pub(super) fn find(table: &StreamingFlights, digest: &Digest) -> Option<watch::Receiver<Stage>> {
    lock(table).get(digest).cloned()
}

/// What a reader gets from a streaming flight.
pub(super) enum Joined {
    /// The bytes, as they arrive.
    Stream(ChunkStream),
    /// The flight stored the blob without offering a follower: read it.
    Stored,
}

/// Waits until the flight behind `stage` has a follower (or ended), and
/// streams `[offset, end)` of the blob from it.
pub(super) async fn join(
    mut stage: watch::Receiver<Stage>,
    offset: u64,
    end: u64,
) -> Result<Joined> {
    let follower = {
        let seen = stage
            .wait_for(|s| !matches!(s, Stage::Starting))
            .await
            .map_err(|_| cancelled())?;
        match &*seen {
            Stage::Writing(follower) => Ok(Some(follower.clone())),
            Stage::Ended(outcome) => duplicate(outcome).map(|()| None),
            Stage::Starting => unreachable!("waited for another stage"),
        }
    }?;
    let Some(follower) = follower else {
        return Ok(Joined::Stored);
    };
    let reader = Follow {
        written: follower.written(),
        follower,
        stage,
        pos: offset,
        end,
        done: false,
    };
    Ok(Joined::Stream(Box::pin(stream::unfold(
        reader,
        |mut reader| async move { reader.next().await.map(|item| (item, reader)) },
    ))))
}

/// One reader's progress through a followed write.
struct Follow {
    /// The writer's bytes.
    follower: WriteFollower,
    /// How many of them are written.
    written: watch::Receiver<u64>,
    /// The flight, for its outcome.
    stage: watch::Receiver<Stage>,
    /// The next byte to hand out.
    pos: u64,
    /// One past the last byte to hand out.
    end: u64,
    /// The range was handed out, or an error was.
    done: bool,
}

impl Follow {
    /// The next chunk of the range; `None` once it is all out (or after an
    /// error).
    async fn next(&mut self) -> Option<Result<Bytes>> {
        if self.done {
            return None;
        }
        let item = self.step().await;
        if !matches!(item, Some(Ok(_))) || self.pos == self.end {
            self.done = true;
        }
        item
    }

    /// Waits for bytes beyond `pos`, then hands out up to a chunk of them;
    /// the chunk that ends the range only once the flight committed.
    async fn step(&mut self) -> Option<Result<Bytes>> {
        let written = loop {
            if self.pos == self.end {
                // An empty range: it still needs the blob to exist.
                return self.outcome().await.err().map(Err);
            }
            let written = *self.written.borrow_and_update();
            if written > self.pos {
                break written;
            }
            if self.written.changed().await.is_err() {
                // The writer is gone: committed, or failed.
                if let Err(e) = self.outcome().await {
                    return Some(Err(e));
                }
                if *self.written.borrow() <= self.pos {
                    return Some(Err(Error::Internal(format!(
                        "a committed fetch wrote {} bytes, short of byte {}",
                        *self.written.borrow(),
                        self.pos
                    ))));
                }
            }
        };
        let upto = written.min(self.end).min(self.pos + FOLLOW_CHUNK);
        if upto == self.end
            && let Err(e) = self.outcome().await
        {
            return Some(Err(e));
        }
        let chunk = self
            .follower
            .read_at(self.pos, (upto - self.pos) as usize)
            .await;
        if chunk.is_ok() {
            self.pos = upto;
        }
        Some(chunk)
    }

    /// Waits for the flight to end: `Ok` once the blob is stored, verified.
    async fn outcome(&mut self) -> Result<()> {
        let ended = self
            .stage
            .wait_for(|s| matches!(s, Stage::Ended(_)))
            .await
            .map_err(|_| cancelled())?;
        match &*ended {
            Stage::Ended(outcome) => duplicate(outcome),
            _ => unreachable!("waited for the end"),
        }
    }
}

/// What a reader gets when the flight stops without an outcome (shutdown),
/// as the single-flight reports it.
fn cancelled() -> Error {
    Error::Unavailable("shutting down: transfer cancelled".into())
}

fn lock(table: &StreamingFlights) -> MutexGuard<'_, HashMap<Digest, watch::Receiver<Stage>>> {
    table.lock().unwrap_or_else(|e| e.into_inner())
}
