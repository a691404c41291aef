//! The one Directory-tree walker: breadth-first, deduplicated, a level at a
//! time. Each level's Directories are read with one `read_many`, so through
//! the proxy a tree costs one upstream round trip per level, not one per
//! Directory. GetTree, the action-result completeness check, execution's
//! input check and prefetch all walk trees with it.

use std::collections::HashSet;

use bazel_remote_apis::build::bazel::remote::execution::v2::Directory;
use prost::Message;

use crate::context::RequestContext;
use crate::digest::{Digest, DigestFunction};
use crate::error::{Error, Result};
use crate::store::BlobStore;

/// One Directory of a level: its digest and its contents, or `None` when the
/// store does not hold it (the walk goes on without its subtree).
pub type Node = (Digest, Option<Directory>);

/// A breadth-first walk over the Directory trees under some roots; every
/// Directory is visited once, however many parents share it.
pub struct TreeWalk<'a, B: BlobStore + ?Sized> {
    /// Where the Directories are read from.
    blobs: &'a B,
    /// The request the reads are made for (instance, headers).
    ctx: &'a RequestContext,
    /// The Directories of the next level, in discovery order.
    level: Vec<Digest>,
    /// Every Directory queued so far, so a shared subtree is read once.
    seen: HashSet<Digest>,
}

impl<'a, B: BlobStore + ?Sized> TreeWalk<'a, B> {
    /// A walk starting at `roots` (duplicates are visited once).
    pub fn new(
        blobs: &'a B,
        ctx: &'a RequestContext,
        roots: impl IntoIterator<Item = Digest>,
    ) -> Self {
        let mut walk = TreeWalk {
            blobs,
            ctx,
            level: Vec::new(),
            seen: HashSet::new(),
        };
        for root in roots {
            walk.queue(root);
        }
        walk
    }

    /// Whether every level has been read.
    pub fn is_done(&self) -> bool {
        self.level.is_empty()
    }

    /// Reads the next level with one `read_many` and queues its children.
    /// `None` once the walk is done. A Directory the store lacks comes back
    /// as `(digest, None)`; any other read or decode failure ends the walk.
    pub async fn next_level(&mut self) -> Result<Option<Vec<Node>>> {
        if self.level.is_empty() {
            return Ok(None);
        }
        let level = std::mem::take(&mut self.level);
        let reads = self.blobs.read_many(self.ctx, &level).await;
        let mut nodes = Vec::with_capacity(level.len());
        for (digest, read) in level.into_iter().zip(reads) {
            let dir = match read {
                Ok(bytes) => Directory::decode(bytes)?,
                Err(Error::NotFound(_)) => {
                    nodes.push((digest, None));
                    continue;
                }
                Err(e) => return Err(e),
            };
            for child in &dir.directories {
                self.queue(Digest::from_proto(digest.function, child.digest.as_ref())?);
            }
            nodes.push((digest, Some(dir)));
        }
        Ok(Some(nodes))
    }

    fn queue(&mut self, digest: Digest) {
        if self.seen.insert(digest) {
            self.level.push(digest);
        }
    }
}

/// What [`tree_blobs`] does about a Directory the store lacks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IfMissing {
    /// List its digest and skip its subtree: someone else (the upstream)
    /// will report it.
    List,
    /// Fail with NOT_FOUND: the tree is incomplete.
    Fail,
}

/// Every blob of the Directory trees under `roots`: each Directory (once)
/// and the files it lists, level by level.
pub async fn tree_blobs<B: BlobStore + ?Sized>(
    blobs: &B,
    ctx: &RequestContext,
    roots: impl IntoIterator<Item = Digest>,
    if_missing: IfMissing,
) -> Result<Vec<Digest>> {
    let mut out = Vec::new();
    let mut walk = TreeWalk::new(blobs, ctx, roots);
    while let Some(level) = walk.next_level().await? {
        for (digest, dir) in level {
            match (dir, if_missing) {
                (Some(dir), _) => {
                    out.push(digest);
                    push_files(digest.function, &dir, &mut out)?;
                }
                (None, IfMissing::List) => out.push(digest),
                (None, IfMissing::Fail) => {
                    return Err(Error::NotFound(format!("directory {digest} not found")));
                }
            }
        }
    }
    Ok(out)
}

/// Adds the digests of the files `dir` lists to `out`.
pub fn push_files(function: DigestFunction, dir: &Directory, out: &mut Vec<Digest>) -> Result<()> {
    for file in &dir.files {
        out.push(Digest::from_proto(function, file.digest.as_ref())?);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::{MemoryStore, count};
    use bazel_remote_apis::build::bazel::remote::execution::v2::{DirectoryNode, FileNode};

    fn dir(files: &[Digest], dirs: &[Digest]) -> Directory {
        Directory {
            files: files
                .iter()
                .enumerate()
                .map(|(i, d)| FileNode {
                    name: format!("f{i}"),
                    digest: Some(d.to_proto()),
                    ..Default::default()
                })
                .collect(),
            directories: dirs
                .iter()
                .enumerate()
                .map(|(i, d)| DirectoryNode {
                    name: format!("d{i}"),
                    digest: Some(d.to_proto()),
                })
                .collect(),
            ..Default::default()
        }
    }

    fn put(store: &MemoryStore, d: &Directory) -> Digest {
        store.insert(&d.encode_to_vec())
    }

    /// root → {a, b}, a → shared, b → shared, shared → file.
    fn diamond(store: &MemoryStore) -> (Digest, Digest, Digest, Digest, Digest) {
        let file = store.insert(b"file");
        let shared = put(store, &dir(&[file], &[]));
        let a = put(store, &dir(&[], &[shared]));
        let b = put(store, &dir(&[file], &[shared]));
        let root = put(store, &dir(&[], &[a, b]));
        (root, a, b, shared, file)
    }

    #[tokio::test]
    async fn reads_each_level_once_and_each_directory_once() {
        let store = MemoryStore::default();
        let (root, a, b, shared, file) = diamond(&store);
        let ctx = RequestContext::default();
        let mut walk = TreeWalk::new(&store, &ctx, [root, root]);
        let mut levels = Vec::new();
        while let Some(level) = walk.next_level().await.unwrap() {
            levels.push(level.into_iter().map(|(d, _)| d).collect::<Vec<_>>());
        }
        assert_eq!(levels, vec![vec![root], vec![a, b], vec![shared]]);
        assert_eq!(count(&store.read_many_calls), 3, "one read_many per level");
        assert_eq!(count(&store.reads), 4, "the shared Directory is read once");

        let blobs = tree_blobs(&store, &ctx, [root], IfMissing::Fail)
            .await
            .unwrap();
        assert_eq!(blobs, vec![root, a, b, file, shared, file]);
    }

    #[tokio::test]
    async fn a_missing_subtree_is_listed_or_fails() {
        let store = MemoryStore::default();
        let file = store.insert(b"file");
        let lost = Digest::of(DigestFunction::Sha256, b"a Directory nobody stored");
        let kept = put(&store, &dir(&[file], &[]));
        let root = put(&store, &dir(&[], &[lost, kept]));
        let ctx = RequestContext::default();

        let mut walk = TreeWalk::new(&store, &ctx, [root]);
        walk.next_level().await.unwrap();
        let level = walk.next_level().await.unwrap().unwrap();
        assert_eq!(level[0], (lost, None));
        assert!(level[1].1.is_some());
        assert!(walk.is_done());

        let listed = tree_blobs(&store, &ctx, [root], IfMissing::List)
            .await
            .unwrap();
        assert_eq!(listed, vec![root, lost, kept, file]);
        let failed = tree_blobs(&store, &ctx, [root], IfMissing::Fail).await;
        assert!(matches!(failed, Err(Error::NotFound(_))), "{failed:?}");
    }

    #[tokio::test]
    async fn read_failures_other_than_not_found_end_the_walk() {
        let store = MemoryStore::default();
        let (root, ..) = diamond(&store);
        store.down.store(true, std::sync::atomic::Ordering::SeqCst);
        let ctx = RequestContext::default();
        let result = tree_blobs(&store, &ctx, [root], IfMissing::List).await;
        assert!(matches!(result, Err(Error::Unavailable(_))), "{result:?}");
    }
}
