//! The asset entries in the local store: a lookup serves an entry only
//! while it is current and all its content is present, and drops it once
//! content is gone; recording writes one entry per URI.

use async_trait::async_trait;

use crate::asset::content::Content;
use crate::asset::request::{AssetRequest, now_secs};
use crate::context::RequestContext;
use crate::digest::{Digest, DigestFunction};
use crate::error::Result;
use crate::store::BlobStore;
use crate::store::asset_index::{AssetIndex, AssetKind, AssetRecord, AssetSource};
use crate::store::local::LocalStore;

/// What the asset service needs of the local store: its CAS, its asset
/// index, and a lookup of blobs by hash alone (for `checksum.sri`).
#[async_trait]
pub trait LocalAssets: AssetIndex + BlobStore {
    /// A stored blob whose `function` hash is `hash`, whatever its size.
    async fn find_by_hash(&self, function: DigestFunction, hash: &[u8]) -> Result<Option<Digest>>;
}

#[async_trait]
impl LocalAssets for LocalStore {
    async fn find_by_hash(&self, function: DigestFunction, hash: &[u8]) -> Result<Option<Digest>> {
        LocalStore::find_by_hash(self, function, hash)
    }
}

/// The first URI of `request` with a servable `kind` entry: current (not
/// expired, not older than `oldest_content_accepted`) and with all its
/// content in the local store (which marks it used). An entry whose content
/// is gone is removed.
pub async fn lookup(
    local: &dyn LocalAssets,
    ctx: &RequestContext,
    request: &AssetRequest,
    kind: AssetKind,
) -> Result<Option<AssetRecord>> {
    let now = now_secs();
    for (i, key) in request.keys().into_iter().enumerate() {
        let Some(record) = local.get_asset(&key).await? else {
            continue;
        };
        if record.kind != kind as i32 {
            continue;
        }
        if record.expire_at != 0 && record.expire_at <= now {
            local.remove_asset(&key).await?;
            continue;
        }
        if request
            .oldest_content_accepted
            .is_some_and(|oldest| record.stored_at < oldest)
        {
            continue;
        }
        // A record whose digests no longer parse can never be served.
        let present = match Content::of(&record) {
            Ok(content) => content.missing(local, ctx).await?.is_empty(),
            Err(_) => false,
        };
        if !present {
            tracing::debug!("asset entry for uri #{i} dropped: some of its content is gone");
            local.remove_asset(&key).await?;
            continue;
        }
        return Ok(Some(record));
    }
    Ok(None)
}

/// A new entry for `uri` of `request` naming `root` (no references; a
/// Push adds its own); not stored yet.
pub fn new_record(
    request: &AssetRequest,
    uri: &str,
    kind: AssetKind,
    source: AssetSource,
    root: Digest,
    stored_at: i64,
    expire_at: i64,
) -> AssetRecord {
    AssetRecord {
        instance: request.instance.clone(),
        uri: uri.to_string(),
        qualifiers: request.stored_qualifiers(),
        kind: kind as i32,
        digest_function: request.digest_function.to_proto(),
        digest: Some(root.to_proto()),
        references_blobs: Vec::new(),
        references_directories: Vec::new(),
        stored_at,
        expire_at,
        source: source as i32,
    }
}

/// Stores `record` under its URI's key.
pub async fn record(
    local: &dyn LocalAssets,
    request: &AssetRequest,
    record: &AssetRecord,
) -> Result<()> {
    local.put_asset(&request.key(&record.uri), record).await
}
