//! Byte layouts of RocksDB keys and index values (see docs/architecture.md).
//!
//! Every key starts with a one-byte kind and the digest function, so that
//! several digest functions can share the store without collisions.

use crate::digest::{Digest, DigestFunction};
use crate::store::ActionKey;
use crate::store::index::{Entry, EntryKind};

const BLOB: u8 = b'b';
const ACTION: u8 = b'a';
const DIGEST_LEN: usize = 1 + 32 + 8;

fn push_digest(key: &mut Vec<u8>, digest: &Digest) {
    key.push(digest.function.tag());
    key.extend_from_slice(&digest.hash);
    key.extend_from_slice(&digest.size.to_be_bytes());
}

fn parse_digest(bytes: &[u8]) -> Option<Digest> {
    let function = DigestFunction::from_tag(*bytes.first()?)?;
    let hash: [u8; 32] = bytes.get(1..33)?.try_into().ok()?;
    let size = u64::from_be_bytes(bytes.get(33..41)?.try_into().ok()?);
    Some(Digest {
        function,
        hash,
        size,
    })
}

/// `b` · function · hash · size (big-endian).
pub fn blob_key(digest: &Digest) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + DIGEST_LEN);
    key.push(BLOB);
    push_digest(&mut key, digest);
    key
}

/// The digest a blob key was made from.
pub fn parse_blob_key(key: &[u8]) -> Option<Digest> {
    if key.first() != Some(&BLOB) || key.len() != 1 + DIGEST_LEN {
        return None;
    }
    parse_digest(&key[1..])
}

/// `a` · function · hash · size · instance name (UTF-8, last so it can be any length).
pub fn action_key(key: &ActionKey) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + DIGEST_LEN + key.instance.len());
    out.push(ACTION);
    push_digest(&mut out, &key.action);
    out.extend_from_slice(key.instance.as_bytes());
    out
}

/// Index value: kind · size (u64 BE) · last access (unix seconds, u64 BE).
pub fn index_value(entry: &Entry) -> [u8; 17] {
    let mut out = [0u8; 17];
    out[0] = entry.kind.tag();
    out[1..9].copy_from_slice(&entry.size.to_be_bytes());
    out[9..17].copy_from_slice(&entry.persisted_atime.to_be_bytes());
    out
}

/// Inverse of [`index_value`].
pub fn parse_index_value(value: &[u8]) -> Option<Entry> {
    if value.len() != 17 {
        return None;
    }
    Some(Entry {
        kind: EntryKind::from_tag(value[0])?,
        size: u64::from_be_bytes(value[1..9].try_into().ok()?),
        persisted_atime: u64::from_be_bytes(value[9..17].try_into().ok()?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        let d = Digest::of(DigestFunction::Sha256, b"x");
        assert_eq!(parse_blob_key(&blob_key(&d)), Some(d));
        let a = action_key(&ActionKey {
            instance: "a/b".into(),
            action: d,
        });
        assert_eq!(parse_blob_key(&a), None);
        assert!(a.ends_with(b"a/b"));
        let e = Entry {
            kind: EntryKind::FileBlob,
            size: 7,
            persisted_atime: 99,
        };
        assert_eq!(parse_index_value(&index_value(&e)), Some(e));
    }
}
