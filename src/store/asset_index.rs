//! The asset index: Remote Asset entries (instance, URI, qualifier set) →
//! blob or directory digest, kept in the local store beside the CAS so they
//! share its quota, its LRU and its crash safety.
//!
//! The key is a hash of the instance name, one URI and the sorted
//! non-credential qualifiers ([`AssetKey::of`]); a Push with several URIs
//! records one entry per URI. The record says what the entry points at and
//! which digests it keeps alive ([`AssetRecord::kept_alive`]); evicting any
//! of those drops the entry.

use async_trait::async_trait;
use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use sha2::{Digest as _, Sha256};

use crate::digest::{Digest, DigestFunction};
use crate::error::Result;

/// Identifies one asset entry: SHA-256 over the instance name, the URI and
/// the qualifiers, each length-prefixed so no two inputs share an encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AssetKey(pub [u8; 32]);

impl AssetKey {
    /// The key of a SHA-256 entry: [`AssetKey::of_function`] with SHA-256.
    pub fn of(instance: &str, uri: &str, qualifiers: &[(String, String)]) -> Self {
        AssetKey::of_function(DigestFunction::Sha256, instance, uri, qualifiers)
    }

    /// The key of `uri` under `instance` with `qualifiers` (name, value),
    /// which the caller has already stripped of credentials; their order
    /// does not matter. Entries of different digest functions have
    /// different keys (a BLAKE3 request is never answered with a SHA-256
    /// digest); SHA-256 keys are those from before other functions existed.
    pub fn of_function(
        function: DigestFunction,
        instance: &str,
        uri: &str,
        qualifiers: &[(String, String)],
    ) -> Self {
        let mut sorted: Vec<&(String, String)> = qualifiers.iter().collect();
        sorted.sort();
        let mut hasher = Sha256::new();
        let mut field = |bytes: &[u8]| {
            hasher.update((bytes.len() as u64).to_be_bytes());
            hasher.update(bytes);
        };
        field(instance.as_bytes());
        field(uri.as_bytes());
        for (name, value) in sorted {
            field(name.as_bytes());
            field(value.as_bytes());
        }
        // One field more: an odd count, which no qualifier (a pair of
        // fields) can produce.
        if function != DigestFunction::Sha256 {
            field(function.name().as_bytes());
        }
        AssetKey(hasher.finalize().into())
    }
}

/// Whether an entry names a single blob (FetchBlob/PushBlob) or a directory
/// tree (FetchDirectory/PushDirectory).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum AssetKind {
    /// `blob_digest` names a blob.
    Blob = 0,
    /// `root_directory_digest` names a Directory; the whole tree is the asset.
    Directory = 1,
}

/// Where an entry came from (for logs, stats and the status page).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum AssetSource {
    /// A client pushed it.
    Push = 0,
    /// Outpost downloaded it from the origin URI.
    Origin = 1,
    /// The upstream's Fetch answered it.
    Upstream = 2,
}

/// One stored asset entry. Persisted as protobuf: fields are only ever
/// added, never renumbered. Never holds a credential-bearing qualifier.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AssetRecord {
    /// The client's instance name.
    #[prost(string, tag = "1")]
    pub instance: String,
    /// The URI this entry answers.
    #[prost(string, tag = "2")]
    pub uri: String,
    /// The qualifiers it was stored with, sorted by name, credentials removed.
    #[prost(message, repeated, tag = "3")]
    pub qualifiers: Vec<bazel_remote_apis::build::bazel::remote::asset::v1::Qualifier>,
    /// Blob or directory.
    #[prost(enumeration = "AssetKind", tag = "4")]
    pub kind: i32,
    /// The digest function of every digest below (REAPI enum value).
    #[prost(int32, tag = "5")]
    pub digest_function: i32,
    /// The blob, or the root Directory.
    #[prost(message, optional, tag = "6")]
    pub digest: Option<re::Digest>,
    /// Blobs kept alive with the entry (Push `references_blobs`).
    #[prost(message, repeated, tag = "7")]
    pub references_blobs: Vec<re::Digest>,
    /// Directory trees kept alive with the entry (Push `references_directories`).
    #[prost(message, repeated, tag = "8")]
    pub references_directories: Vec<re::Digest>,
    /// When the content was pushed, or its retrieval started (unix seconds):
    /// what `oldest_content_accepted` is compared with.
    #[prost(int64, tag = "9")]
    pub stored_at: i64,
    /// After this (unix seconds) the entry is not served; 0 = never expires.
    #[prost(int64, tag = "10")]
    pub expire_at: i64,
    /// Where it came from.
    #[prost(enumeration = "AssetSource", tag = "11")]
    pub source: i32,
}

impl AssetRecord {
    /// The digest function of the record's digests.
    pub fn function(&self) -> Result<DigestFunction> {
        DigestFunction::from_proto(self.digest_function)
    }

    /// The blob or root directory the entry names.
    pub fn root(&self) -> Result<Digest> {
        Digest::from_proto(self.function()?, self.digest.as_ref())
    }

    /// Every digest named directly by the entry: the root, then the
    /// referenced blobs, then the referenced directories' roots. The entry is
    /// served only while all of them (and every referenced tree) are
    /// present; evicting one of them drops the entry.
    pub fn kept_alive(&self) -> Result<Vec<Digest>> {
        let function = self.function()?;
        let mut out = vec![self.root()?];
        for d in self
            .references_blobs
            .iter()
            .chain(&self.references_directories)
        {
            out.push(Digest::from_proto(function, Some(d))?);
        }
        Ok(out)
    }

    /// The directory roots whose whole trees belong to the entry: the root
    /// of a directory asset, then the referenced directories.
    pub fn trees(&self) -> Result<Vec<Digest>> {
        let function = self.function()?;
        let mut out = Vec::new();
        if self.kind == AssetKind::Directory as i32 {
            out.push(self.root()?);
        }
        for d in &self.references_directories {
            out.push(Digest::from_proto(function, Some(d))?);
        }
        Ok(out)
    }
}

/// Where asset entries are kept: the local store implements it.
#[async_trait]
pub trait AssetIndex: Send + Sync + 'static {
    /// The entry under `key`, marking it used; `None` if absent. Presence of
    /// the content it names is the caller's to check.
    async fn get_asset(&self, key: &AssetKey) -> Result<Option<AssetRecord>>;

    /// Stores (or replaces) the entry under `key`; it counts against the
    /// quota like a blob. Evicting a digest of [`AssetRecord::kept_alive`]
    /// drops it at once; the inner nodes of its trees are not tracked, so
    /// the caller checks whole trees when it serves the entry.
    async fn put_asset(&self, key: &AssetKey, record: &AssetRecord) -> Result<()>;

    /// Forgets the entry (e.g. because content it names is gone).
    async fn remove_asset(&self, key: &AssetKey) -> Result<()>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(name: &str, value: &str) -> (String, String) {
        (name.to_string(), value.to_string())
    }

    #[test]
    fn keys_ignore_qualifier_order_but_not_content() {
        let a = AssetKey::of("i", "https://x/y", &[q("a", "1"), q("b", "2")]);
        let b = AssetKey::of("i", "https://x/y", &[q("b", "2"), q("a", "1")]);
        assert_eq!(a, b);
        assert_ne!(
            a,
            AssetKey::of("j", "https://x/y", &[q("a", "1"), q("b", "2")])
        );
        assert_ne!(
            a,
            AssetKey::of("i", "https://x/z", &[q("a", "1"), q("b", "2")])
        );
        assert_ne!(a, AssetKey::of("i", "https://x/y", &[q("a", "1")]));
        // Length prefixes: moving a byte between fields changes the key.
        assert_ne!(AssetKey::of("ab", "c", &[]), AssetKey::of("a", "bc", &[]));
        let sha256 = AssetKey::of_function(DigestFunction::Sha256, "i", "u", &[]);
        let blake3 = AssetKey::of_function(DigestFunction::Blake3, "i", "u", &[]);
        assert_eq!(sha256, AssetKey::of("i", "u", &[]));
        assert_ne!(sha256, blake3);
        assert_ne!(
            blake3,
            AssetKey::of_function(DigestFunction::Sha512, "i", "u", &[])
        );
    }

    #[test]
    fn a_record_keeps_alive_its_root_and_references() {
        let f = DigestFunction::Sha256;
        let (root, blob, dir) = (
            Digest::of(f, b"root"),
            Digest::of(f, b"blob"),
            Digest::of(f, b"dir"),
        );
        let record = AssetRecord {
            kind: AssetKind::Directory as i32,
            digest_function: f.to_proto(),
            digest: Some(root.to_proto()),
            references_blobs: vec![blob.to_proto()],
            references_directories: vec![dir.to_proto()],
            ..Default::default()
        };
        assert_eq!(record.kept_alive().unwrap(), vec![root, blob, dir]);
        assert_eq!(record.trees().unwrap(), vec![root, dir]);
    }
}
