//! Validated digests and incremental hashing.
//!
//! Wire digests (`hash` hex string + `size_bytes`) are parsed once at the
//! service edge into [`Digest`], which cannot hold a malformed hash or a
//! negative size. The digest function is part of the value (and of every
//! storage key) so that BLAKE3 and friends can be added without ambiguity.

use std::fmt;

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use re::digest_function::Value as DigestFunctionProto;
use sha2::{Digest as _, Sha256};

use crate::error::{Error, Result, clip};

/// The hash functions Outpost can verify. Only SHA-256 today.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DigestFunction {
    /// SHA-256, REAPI's default.
    Sha256,
}

impl DigestFunction {
    /// Number of raw hash bytes.
    pub const fn hash_len(self) -> usize {
        match self {
            DigestFunction::Sha256 => 32,
        }
    }

    /// Stable one-byte tag used in storage keys; never renumber.
    pub const fn tag(self) -> u8 {
        match self {
            DigestFunction::Sha256 => 1,
        }
    }

    /// Inverse of [`DigestFunction::tag`].
    pub fn from_tag(tag: u8) -> Option<Self> {
        match tag {
            1 => Some(DigestFunction::Sha256),
            _ => None,
        }
    }

    /// Lower-case name, as used in resource names and file paths.
    pub const fn name(self) -> &'static str {
        match self {
            DigestFunction::Sha256 => "sha256",
        }
    }

    /// The REAPI enum value.
    pub fn to_proto(self) -> i32 {
        match self {
            DigestFunction::Sha256 => DigestFunctionProto::Sha256 as i32,
        }
    }

    /// Maps a request's `digest_function` field. `UNKNOWN` (0) means SHA-256,
    /// as the spec says for clients that predate the field.
    pub fn from_proto(value: i32) -> Result<Self> {
        match DigestFunctionProto::try_from(value) {
            Ok(DigestFunctionProto::Unknown) | Ok(DigestFunctionProto::Sha256) => {
                Ok(DigestFunction::Sha256)
            }
            Ok(other) => Err(Error::InvalidArgument(format!(
                "digest function {} is not supported by this server (supported: SHA256)",
                other.as_str_name()
            ))),
            Err(_) => Err(Error::InvalidArgument(format!(
                "unknown digest function value {value} (supported: SHA256)"
            ))),
        }
    }

    /// Maps a resource-name segment such as `sha256` or `blake3`, if it names
    /// a digest function at all. `Some(Err)` means a known but unsupported one.
    pub fn from_resource_segment(segment: &str) -> Option<Result<Self>> {
        let upper = segment.to_ascii_uppercase();
        match DigestFunctionProto::from_str_name(&upper) {
            Some(DigestFunctionProto::Sha256) => Some(Ok(DigestFunction::Sha256)),
            Some(DigestFunctionProto::Unknown) | None => None,
            Some(other) => Some(Err(Error::InvalidArgument(format!(
                "digest function {} is not supported by this server (supported: SHA256)",
                other.as_str_name()
            )))),
        }
    }
}

/// A validated content digest: function, raw hash and size.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    /// Which function produced `hash`.
    pub function: DigestFunction,
    /// The raw hash bytes (only the first `function.hash_len()` are used).
    pub hash: [u8; 32],
    /// Size of the blob in bytes.
    pub size: u64,
}

impl Digest {
    /// Builds a digest from a hex hash and a size, rejecting malformed input.
    pub fn parse(function: DigestFunction, hash_hex: &str, size: i64) -> Result<Self> {
        // The client's hash, as echoed in the messages below.
        let shown = || clip(hash_hex);
        if size < 0 {
            return Err(Error::InvalidArgument(format!(
                "digest {}/{size}: size_bytes must not be negative",
                shown()
            )));
        }
        let len = function.hash_len();
        if hash_hex.len() != len * 2 {
            return Err(Error::InvalidArgument(format!(
                "digest {}/{size}: a {} hash has {} hex characters, got {}",
                shown(),
                function.name(),
                len * 2,
                hash_hex.len()
            )));
        }
        if hash_hex.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(Error::InvalidArgument(format!(
                "digest {}/{size}: the hash must be lower-case hex",
                shown()
            )));
        }
        let mut hash = [0u8; 32];
        hex::decode_to_slice(hash_hex, &mut hash[..len]).map_err(|_| {
            Error::InvalidArgument(format!("digest {}/{size}: the hash is not hex", shown()))
        })?;
        Ok(Digest {
            function,
            hash,
            size: size as u64,
        })
    }

    /// Parses a wire digest; a missing digest is an INVALID_ARGUMENT.
    pub fn from_proto(function: DigestFunction, digest: Option<&re::Digest>) -> Result<Self> {
        let digest =
            digest.ok_or_else(|| Error::InvalidArgument("a required digest is missing".into()))?;
        Digest::parse(function, &digest.hash, digest.size_bytes)
    }

    /// The wire form.
    pub fn to_proto(&self) -> re::Digest {
        re::Digest {
            hash: self.hash_hex(),
            size_bytes: self.size as i64,
        }
    }

    /// Computes the digest of `data`.
    pub fn of(function: DigestFunction, data: &[u8]) -> Self {
        let mut hasher = Hasher::new(function);
        hasher.update(data);
        hasher.finish()
    }

    /// The raw hash bytes.
    pub fn hash_bytes(&self) -> &[u8] {
        &self.hash[..self.function.hash_len()]
    }

    /// The hash as lower-case hex.
    pub fn hash_hex(&self) -> String {
        hex::encode(self.hash_bytes())
    }

    /// One past the last byte a read of `limit` bytes from `offset` covers
    /// (ByteStream: a `limit` of 0 means to the end).
    pub fn read_end(&self, offset: u64, limit: u64) -> u64 {
        match limit {
            0 => self.size,
            n => self.size.min(offset.saturating_add(n)),
        }
    }

    /// True for the empty blob, which every CAS always holds.
    pub fn is_empty_blob(&self) -> bool {
        self.size == 0 && *self == Digest::of(self.function, &[])
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.hash_hex(), self.size)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({}:{self})", self.function.name())
    }
}

/// Incremental hashing of a blob that arrives in pieces (`Clone`: a
/// resumable compressed upload keeps the state at its last frame boundary).
#[derive(Clone)]
pub struct Hasher {
    function: DigestFunction,
    sha256: Sha256,
    size: u64,
}

impl Hasher {
    /// A hasher for `function`.
    pub fn new(function: DigestFunction) -> Self {
        Hasher {
            function,
            sha256: Sha256::new(),
            size: 0,
        }
    }

    /// Feeds the next piece of the blob.
    pub fn update(&mut self, data: &[u8]) {
        self.sha256.update(data);
        self.size += data.len() as u64;
    }

    /// Bytes fed so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The digest of everything fed.
    pub fn finish(self) -> Digest {
        let out = self.sha256.finalize();
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&out);
        Digest {
            function: self.function,
            hash,
            size: self.size,
        }
    }
}

/// Checks that data really has the digest it claims, and says how not.
pub fn verify(expected: &Digest, actual: &Digest) -> Result<()> {
    if actual.size != expected.size {
        return Err(Error::InvalidArgument(format!(
            "size mismatch for {expected}: received {} bytes",
            actual.size
        )));
    }
    if actual.hash != expected.hash {
        return Err(Error::InvalidArgument(format!(
            "hash mismatch for {expected}: the data received hashes to {}",
            actual.hash_hex()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parses_and_prints_round_trip() {
        let d = Digest::parse(DigestFunction::Sha256, EMPTY, 0).unwrap();
        assert_eq!(d.hash_hex(), EMPTY);
        assert!(d.is_empty_blob());
        assert_eq!(d.to_string(), format!("{EMPTY}/0"));
    }

    #[test]
    fn rejects_malformed_hashes() {
        let f = DigestFunction::Sha256;
        assert!(Digest::parse(f, "abc", 1).is_err());
        assert!(Digest::parse(f, &EMPTY.to_uppercase(), 0).is_err());
        assert!(Digest::parse(f, &"g".repeat(64), 0).is_err());
        assert!(Digest::parse(f, EMPTY, -1).is_err());
    }

    #[test]
    fn a_huge_hash_is_not_echoed_whole() {
        let f = DigestFunction::Sha256;
        for (hash, size) in [("a".repeat(10_000), 1), ("A".repeat(10_000), -1)] {
            let message = Digest::parse(f, &hash, size).unwrap_err().to_string();
            assert!(message.len() < 400, "{} bytes", message.len());
        }
    }

    #[test]
    fn verify_reports_size_then_hash() {
        let f = DigestFunction::Sha256;
        let a = Digest::of(f, b"hello");
        let b = Digest::of(f, b"world");
        let short = Digest::of(f, b"hell");
        assert!(verify(&a, &a).is_ok());
        assert!(
            verify(&a, &b)
                .unwrap_err()
                .to_string()
                .contains("hash mismatch")
        );
        assert!(
            verify(&a, &short)
                .unwrap_err()
                .to_string()
                .contains("size mismatch")
        );
    }

    #[test]
    fn digest_function_mapping() {
        assert_eq!(
            DigestFunction::from_proto(0).unwrap(),
            DigestFunction::Sha256
        );
        assert_eq!(
            DigestFunction::from_proto(1).unwrap(),
            DigestFunction::Sha256
        );
        assert!(DigestFunction::from_proto(2).is_err());
        assert!(DigestFunction::from_proto(999).is_err());
        assert!(
            DigestFunction::from_resource_segment("blake3")
                .unwrap()
                .is_err()
        );
        assert!(
            DigestFunction::from_resource_segment("sha256")
                .unwrap()
                .is_ok()
        );
        assert!(DigestFunction::from_resource_segment("abc").is_none());
    }
}
