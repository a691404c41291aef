//! What a prefetch job may fetch for one finished action, each blob with
//! its [`Kind`]: stdout/stderr, output files, and each output directory's
//! Tree, Directory messages and files (read through the proxy CAS, so the
//! Trees and Directories are fetched on the way, like the client will).

use bazel_remote_apis::build::bazel::remote::execution::v2::Tree;
use futures::future::try_join_all;
use prost::Message;

use super::learner::{Learner, Offer, OfferedDir};
use super::policy::Kind;
use crate::context::RequestContext;
use crate::digest::{Digest, DigestFunction};
use crate::error::{Error, Result};
use crate::reapi::tree::{TreeWalk, push_files};
use crate::store::{BlobStore, read_to_bytes};

/// Every blob of `offer` with its kind: std streams and directory metadata
/// first (clients read them first), then files. The directories' contents
/// are registered with `learner` as they are found. Err(NotFound) if a Tree
/// or Directory is missing.
pub async fn list(
    blobs: &dyn BlobStore,
    learner: &Learner,
    ctx: &RequestContext,
    function: DigestFunction,
    offer: &Offer,
) -> Result<Vec<(Digest, Kind)>> {
    let contents = try_join_all(
        offer
            .dirs
            .iter()
            .map(|dir| dir_contents(blobs, ctx, function, dir)),
    )
    .await?;
    let mut out: Vec<(Digest, Kind)> = offer.std.iter().map(|d| (*d, Kind::Std)).collect();
    let mut files: Vec<(Digest, Kind)> = offer.files.iter().map(|d| (*d, Kind::File)).collect();
    for (dir, (directories, dir_files)) in offer.dirs.iter().zip(contents) {
        learner.add_dir_contents(offer, dir, &directories, &dir_files);
        out.extend(directories.into_iter().map(|d| (d, Kind::Metadata)));
        files.extend(dir_files.into_iter().map(|d| (d, Kind::DirFile)));
    }
    out.extend(files);
    Ok(out)
}

/// The Tree and Directory blobs of `dir`, and the files it holds.
async fn dir_contents(
    blobs: &dyn BlobStore,
    ctx: &RequestContext,
    function: DigestFunction,
    dir: &OfferedDir,
) -> Result<(Vec<Digest>, Vec<Digest>)> {
    let (mut directories, mut files) = (Vec::new(), Vec::new());
    if let Some(tree) = dir.tree {
        let message = Tree::decode(read_to_bytes(blobs, ctx, &tree).await?)?;
        directories.push(tree);
        for directory in message.root.iter().chain(message.children.iter()) {
            push_files(function, directory, &mut files)?;
        }
    }
    if let Some(root) = dir.root {
        let mut walk = TreeWalk::new(blobs, ctx, [root]);
        while let Some(level) = walk.next_level().await? {
            for (digest, directory) in level {
                let directory = directory
                    .ok_or_else(|| Error::NotFound(format!("directory {digest} not found")))?;
                directories.push(digest);
                push_files(function, &directory, &mut files)?;
            }
        }
    }
    // A directory named both ways lists its files twice.
    files.sort_unstable();
    files.dedup();
    Ok((directories, files))
}
