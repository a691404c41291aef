//! Bounded memories of the adaptive prefetch: which invocation produced an
//! output blob (so a client read can be credited to it), and how often
//! clients read each output path across invocations (history).
//!
//! Both are plain LRU maps without locks; [`super::learner`] owns them
//! behind its mutex.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::num::NonZeroUsize;
use std::sync::Arc;

use lru::LruCache;

use super::policy::{Kind, PathCounts};
use crate::digest::Digest;

/// An output path with the mnemonic of the action that writes it, hashed
/// (history keeps 8 bytes per path, not the strings).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PathKey(u64);

impl PathKey {
    /// The key of `path` written by an action with `mnemonic` (may be empty:
    /// clients that send no mnemonic share one per path).
    pub fn new(mnemonic: &str, path: &str) -> Self {
        let mut hasher = DefaultHasher::new();
        (mnemonic, path).hash(&mut hasher);
        PathKey(hasher.finish())
    }
}

/// What the registry knows of one output blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Output {
    /// The invocation whose action produced it.
    pub invocation: Arc<str>,
    /// What it is to the client.
    pub kind: Kind,
    /// Its path's history entry.
    pub path: PathKey,
    /// For a file inside an output directory: the directory's registered
    /// digest (its Tree, or its root Directory), which its reads credit.
    pub parent: Option<Digest>,
    /// A client read it (for a directory: any file in it).
    pub read: bool,
    /// A later action of the invocation took it as input.
    pub consumed: bool,
    /// Prefetch left it for the client (a read of it then counts as missed).
    pub skipped: bool,
}

impl Output {
    /// A fresh entry: not read, consumed or skipped yet.
    pub fn new(invocation: Arc<str>, kind: Kind, path: PathKey, parent: Option<Digest>) -> Self {
        Output {
            invocation,
            kind,
            path,
            parent,
            read: false,
            consumed: false,
            skipped: false,
        }
    }

    /// Whether it counts as an offered output (std streams and Trees are
    /// read by clients anyway; files in directories count as their
    /// directory).
    pub fn offered(&self) -> bool {
        match self.kind {
            Kind::File => true,
            Kind::Metadata => self.parent.is_none(),
            Kind::Std | Kind::DirFile => false,
        }
    }
}

/// Output blobs by digest, most recent producer wins (bounded).
pub struct Registry {
    outputs: LruCache<Digest, Output>,
}

impl Registry {
    /// An empty registry of at most `capacity` blobs.
    pub fn new(capacity: usize) -> Self {
        Registry {
            outputs: LruCache::new(NonZeroUsize::new(capacity.max(1)).expect("non-zero")),
        }
    }

    /// Registers `output` as `digest` (empty blobs are never registered:
    /// every client has them).
    pub fn put(&mut self, digest: Digest, output: Output) {
        if digest.size > 0 {
            self.outputs.put(digest, output);
        }
    }

    /// The entry of `digest`, if registered (refreshes it).
    pub fn get_mut(&mut self, digest: &Digest) -> Option<&mut Output> {
        self.outputs.get_mut(digest)
    }

    /// The entry of `digest` without refreshing it.
    pub fn peek(&self, digest: &Digest) -> Option<&Output> {
        self.outputs.peek(digest)
    }
}

/// Read/offer counts per output path across invocations (bounded).
pub struct History {
    paths: LruCache<PathKey, PathCounts>,
}

impl History {
    /// An empty history of at most `capacity` paths.
    pub fn new(capacity: usize) -> Self {
        History {
            paths: LruCache::new(NonZeroUsize::new(capacity.max(1)).expect("non-zero")),
        }
    }

    /// Counts one more offer of `path`; returns its counts before it.
    pub fn offer(&mut self, path: PathKey) -> PathCounts {
        let counts = self.paths.get_or_insert_mut(path, PathCounts::default);
        let before = *counts;
        counts.offered += 1;
        before
    }

    /// Counts a read of `path` by one invocation (call once per offer).
    pub fn read(&mut self, path: PathKey) {
        self.paths.get_or_insert_mut(path, PathCounts::default).read += 1;
    }

    /// Counts `path` taken as input in one invocation (once per offer).
    pub fn consumed(&mut self, path: PathKey) {
        self.paths
            .get_or_insert_mut(path, PathCounts::default)
            .consumed += 1;
    }

    /// The counts of `path` (zero if unknown).
    pub fn get(&self, path: PathKey) -> PathCounts {
        self.paths.peek(&path).copied().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::DigestFunction;

    fn output(kind: Kind) -> Output {
        Output::new("inv".into(), kind, PathKey::new("CppCompile", "a.o"), None)
    }

    #[test]
    fn path_keys_tell_mnemonic_and_path_apart() {
        let key = PathKey::new("CppCompile", "a.o");
        assert_eq!(key, PathKey::new("CppCompile", "a.o"));
        assert_ne!(key, PathKey::new("CppLink", "a.o"));
        assert_ne!(key, PathKey::new("CppCompile", "b.o"));
        assert_ne!(PathKey::new("ab", "c"), PathKey::new("a", "bc"));
    }

    #[test]
    fn the_registry_is_bounded_and_skips_empty_blobs() {
        let mut registry = Registry::new(2);
        let d = |s: &[u8]| Digest::of(DigestFunction::Sha256, s);
        registry.put(d(b""), output(Kind::File));
        assert!(registry.peek(&d(b"")).is_none(), "the empty blob");
        registry.put(d(b"1"), output(Kind::File));
        registry.put(d(b"2"), output(Kind::Std));
        registry.get_mut(&d(b"1")).unwrap().read = true;
        registry.put(d(b"3"), output(Kind::File));
        assert!(
            registry.peek(&d(b"2")).is_none(),
            "least recently used goes"
        );
        assert!(registry.peek(&d(b"1")).unwrap().read);
        assert!(registry.peek(&d(b"3")).is_some());
    }

    #[test]
    fn offered_outputs_are_files_and_directories() {
        assert!(output(Kind::File).offered());
        assert!(output(Kind::Metadata).offered(), "a directory's own entry");
        assert!(!output(Kind::Std).offered());
        assert!(!output(Kind::DirFile).offered());
        let mut sub = output(Kind::Metadata);
        sub.parent = Some(Digest::of(DigestFunction::Sha256, b"tree"));
        assert!(!sub.offered(), "a Directory inside an output directory");
    }

    #[test]
    fn history_counts_offers_reads_and_inputs() {
        let mut history = History::new(1);
        let (a, b) = (PathKey::new("M", "a"), PathKey::new("M", "b"));
        assert_eq!(history.offer(a), PathCounts::default());
        history.read(a);
        history.consumed(a);
        let before = history.offer(a);
        assert_eq!((before.offered, before.read, before.consumed), (1, 1, 1));
        assert_eq!(history.get(a).offered, 2);
        history.offer(b);
        assert_eq!(history.get(a), PathCounts::default(), "evicted");
    }
}
