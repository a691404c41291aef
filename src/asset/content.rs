//! What an asset entry's content is (blobs named directly, directory trees
//! named by their roots) and which of its blobs a store lacks.

use std::collections::HashSet;

use crate::context::RequestContext;
use crate::digest::Digest;
use crate::error::Result;
use crate::reapi::tree::{IfMissing, tree_blobs};
use crate::store::BlobStore;
use crate::store::asset_index::{AssetKind, AssetRecord};

/// The content an entry needs present: every digest in `direct`, and every
/// blob of every tree under `trees`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Content {
    /// The blob or root, then the referenced blobs and directory roots.
    pub direct: Vec<Digest>,
    /// The roots whose whole trees belong to the entry.
    pub trees: Vec<Digest>,
}

impl Content {
    /// The content of a stored entry.
    pub fn of(record: &AssetRecord) -> Result<Self> {
        Ok(Content {
            direct: record.kept_alive()?,
            trees: record.trees()?,
        })
    }

    /// The content of a Push: `root` (a blob, or a directory for
    /// `AssetKind::Directory`) and the references kept alive with it.
    pub fn of_push(
        kind: AssetKind,
        root: Digest,
        references_blobs: &[Digest],
        references_directories: &[Digest],
    ) -> Self {
        let mut direct = vec![root];
        direct.extend_from_slice(references_blobs);
        direct.extend_from_slice(references_directories);
        let mut trees = Vec::new();
        if kind == AssetKind::Directory {
            trees.push(root);
        }
        trees.extend_from_slice(references_directories);
        Content { direct, trees }
    }

    /// Every blob of the content, each once: the direct digests, then each
    /// tree's Directories and files as read from `cas` (a Directory `cas`
    /// lacks is listed, its subtree unknown).
    pub async fn blobs<B: BlobStore + ?Sized>(
        &self,
        cas: &B,
        ctx: &RequestContext,
    ) -> Result<Vec<Digest>> {
        let mut all = self.direct.clone();
        if !self.trees.is_empty() {
            all.extend(tree_blobs(cas, ctx, self.trees.iter().copied(), IfMissing::List).await?);
        }
        let mut seen = HashSet::new();
        all.retain(|d| seen.insert(*d));
        Ok(all)
    }

    /// The blobs of the content `cas` does not hold (for the local store,
    /// asking also marks the present ones used).
    pub async fn missing<B: BlobStore + ?Sized>(
        &self,
        cas: &B,
        ctx: &RequestContext,
    ) -> Result<Vec<Digest>> {
        let blobs = self.blobs(cas, ctx).await?;
        cas.find_missing(ctx, &blobs).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::DigestFunction;
    use crate::store::memory::MemoryStore;
    use bazel_remote_apis::build::bazel::remote::execution::v2::{
        Directory, DirectoryNode, FileNode,
    };
    use prost::Message;

    #[tokio::test]
    async fn lists_what_a_store_lacks_of_blobs_and_whole_trees() {
        let store = MemoryStore::default();
        let ctx = RequestContext::default();
        let file = store.insert(b"file");
        let gone = Digest::of(DigestFunction::Sha256, b"evicted file");
        let sub = store.insert(
            &Directory {
                files: vec![
                    FileNode {
                        name: "a".into(),
                        digest: Some(file.to_proto()),
                        ..Default::default()
                    },
                    FileNode {
                        name: "b".into(),
                        digest: Some(gone.to_proto()),
                        ..Default::default()
                    },
                ],
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
        let blob = store.insert(b"blob");
        let content = Content::of_push(AssetKind::Directory, root, &[blob, file], &[]);
        assert_eq!(content.direct, vec![root, blob, file]);
        assert_eq!(content.trees, vec![root]);
        assert_eq!(
            content.blobs(&store, &ctx).await.unwrap(),
            vec![root, blob, file, sub, gone]
        );
        assert_eq!(content.missing(&store, &ctx).await.unwrap(), vec![gone]);
        let as_blob = Content::of_push(AssetKind::Blob, blob, &[], &[]);
        assert!(as_blob.missing(&store, &ctx).await.unwrap().is_empty());
    }
}
