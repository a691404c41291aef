//! Validated digests and incremental hashing.
//!
//! Wire digests (`hash` hex string + `size_bytes`) are parsed once at the
//! service edge into [`Digest`], which cannot hold a malformed hash or a
//! negative size. The digest function is part of the value (and of every
//! storage key), so a BLAKE3 blob and a SHA-256 blob never collide.

use std::fmt;

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use re::digest_function::Value as DigestFunctionProto;
use sha2::Digest as _;

use crate::error::{Error, Result, clip};

/// Longest raw hash of any supported function (SHA-512).
pub const MAX_HASH_LEN: usize = 64;

/// The hash functions Outpost can verify.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DigestFunction {
    /// SHA-256, REAPI's default.
    Sha256,
    /// SHA-384.
    Sha384,
    /// SHA-512.
    Sha512,
    /// BLAKE3 (256-bit output); cannot be told from SHA-256 by length.
    Blake3,
    /// SHA-1, for old clients.
    Sha1,
    /// MD5, for old clients.
    Md5,
}

impl DigestFunction {
    /// Every supported function, SHA-256 first (the order Capabilities lists them).
    pub const ALL: [DigestFunction; 6] = [
        DigestFunction::Sha256,
        DigestFunction::Sha384,
        DigestFunction::Sha512,
        DigestFunction::Blake3,
        DigestFunction::Sha1,
        DigestFunction::Md5,
    ];

    /// Number of raw hash bytes.
    pub const fn hash_len(self) -> usize {
        match self {
            DigestFunction::Sha256 | DigestFunction::Blake3 => 32,
            DigestFunction::Sha384 => 48,
            DigestFunction::Sha512 => 64,
            DigestFunction::Sha1 => 20,
            DigestFunction::Md5 => 16,
        }
    }

    /// Stable one-byte tag used in storage keys; never renumber. It is the
    /// REAPI enum value, which fits a byte for every supported function.
    pub const fn tag(self) -> u8 {
        match self {
            DigestFunction::Sha256 => 1,
            DigestFunction::Sha1 => 2,
            DigestFunction::Md5 => 3,
            DigestFunction::Sha384 => 5,
            DigestFunction::Sha512 => 6,
            DigestFunction::Blake3 => 9,
        }
    }

    /// Inverse of [`DigestFunction::tag`].
    pub fn from_tag(tag: u8) -> Option<Self> {
        DigestFunction::ALL.into_iter().find(|f| f.tag() == tag)
    }

    /// Lower-case name, as used in resource names and file paths.
    pub const fn name(self) -> &'static str {
        match self {
            DigestFunction::Sha256 => "sha256",
            DigestFunction::Sha384 => "sha384",
            DigestFunction::Sha512 => "sha512",
            DigestFunction::Blake3 => "blake3",
            DigestFunction::Sha1 => "sha1",
            DigestFunction::Md5 => "md5",
        }
    }

    /// The REAPI enum value.
    pub fn to_proto(self) -> i32 {
        i32::from(self.tag())
    }

    /// True when the hash length alone names this function (the spec's
    /// "infer from the length" set), so resource names omit its segment.
    pub fn known_by_length(self) -> bool {
        DigestFunction::by_hex_len(self.hash_len() * 2) == Some(self)
    }

    /// The function a hex hash of `len` characters implies when a request
    /// does not name one (32 → MD5, 40 → SHA-1, 64 → SHA-256, 96 → SHA-384,
    /// 128 → SHA-512).
    pub fn by_hex_len(len: usize) -> Option<Self> {
        match len {
            32 => Some(DigestFunction::Md5),
            40 => Some(DigestFunction::Sha1),
            64 => Some(DigestFunction::Sha256),
            96 => Some(DigestFunction::Sha384),
            128 => Some(DigestFunction::Sha512),
            _ => None,
        }
    }

    /// The function of a request: its explicit `digest_function` field, or,
    /// when that is UNKNOWN (0), the one the length of its first hash implies
    /// (SHA-256 when there is none or the length names none: the digests
    /// then fail to parse with INVALID_ARGUMENT). An explicit function whose
    /// length the hashes do not match is refused when they are parsed.
    pub fn for_request(field: i32, first_hash: Option<&str>) -> Result<Self> {
        if field != DigestFunctionProto::Unknown as i32 {
            return DigestFunction::from_proto(field);
        }
        Ok(first_hash
            .and_then(|h| DigestFunction::by_hex_len(h.len()))
            .unwrap_or(DigestFunction::Sha256))
    }

    /// Maps an explicit `digest_function` field. `UNKNOWN` (0) means SHA-256,
    /// as the spec says for clients that predate the field; requests that
    /// carry hashes use [`DigestFunction::for_request`] instead.
    pub fn from_proto(value: i32) -> Result<Self> {
        if value == DigestFunctionProto::Unknown as i32 {
            return Ok(DigestFunction::Sha256);
        }
        let found = u8::try_from(value).ok().and_then(DigestFunction::from_tag);
        found.ok_or_else(|| match DigestFunctionProto::try_from(value) {
            Ok(other) => Error::InvalidArgument(format!(
                "digest function {} is not supported by this server (supported: {})",
                other.as_str_name(),
                supported_names()
            )),
            Err(_) => Error::InvalidArgument(format!(
                "unknown digest function value {value} (supported: {})",
                supported_names()
            )),
        })
    }

    /// Maps a resource-name segment such as `sha256` or `blake3`, if it names
    /// a digest function at all. `Some(Err)` means a known but unsupported one.
    pub fn from_resource_segment(segment: &str) -> Option<Result<Self>> {
        if let Some(f) = DigestFunction::ALL
            .into_iter()
            .find(|f| f.name() == segment)
        {
            return Some(Ok(f));
        }
        let upper = segment.to_ascii_uppercase();
        match DigestFunctionProto::from_str_name(&upper) {
            Some(DigestFunctionProto::Unknown) | None => None,
            Some(other) => Some(Err(Error::InvalidArgument(format!(
                "digest function {} is not supported by this server (supported: {})",
                other.as_str_name(),
                supported_names()
            )))),
        }
    }
}

/// "SHA256, SHA384, …" for error messages.
fn supported_names() -> String {
    let names: Vec<&str> = DigestFunction::ALL
        .iter()
        .filter_map(|f| DigestFunctionProto::try_from(f.to_proto()).ok())
        .map(|p| p.as_str_name())
        .collect();
    names.join(", ")
}

/// A validated content digest: function, raw hash and size.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    /// Which function produced `hash`.
    pub function: DigestFunction,
    /// The raw hash bytes: the first `function.hash_len()` are the hash,
    /// the rest are always zero (so equality and ordering stay plain).
    pub hash: [u8; MAX_HASH_LEN],
    /// Size of the blob in bytes.
    pub size: u64,
}

impl Digest {
    /// Builds a digest from raw hash bytes; `None` when their length is not
    /// the function's.
    pub fn from_raw(function: DigestFunction, raw: &[u8], size: u64) -> Option<Self> {
        if raw.len() != function.hash_len() {
            return None;
        }
        let mut hash = [0u8; MAX_HASH_LEN];
        hash[..raw.len()].copy_from_slice(raw);
        Some(Digest {
            function,
            hash,
            size,
        })
    }

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
        let mut hash = [0u8; MAX_HASH_LEN];
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
    /// The function's running state.
    state: HashState,
    /// Bytes fed so far: the digest's size.
    size: u64,
}

/// One running hash per supported function.
#[derive(Clone)]
enum HashState {
    Sha256(sha2::Sha256),
    Sha384(sha2::Sha384),
    Sha512(sha2::Sha512),
    Blake3(Box<blake3::Hasher>),
    Sha1(sha1::Sha1),
    Md5(md5::Md5),
}

impl Hasher {
    /// A hasher for `function`.
    pub fn new(function: DigestFunction) -> Self {
        let state = match function {
            DigestFunction::Sha256 => HashState::Sha256(sha2::Sha256::new()),
            DigestFunction::Sha384 => HashState::Sha384(sha2::Sha384::new()),
            DigestFunction::Sha512 => HashState::Sha512(sha2::Sha512::new()),
            DigestFunction::Blake3 => HashState::Blake3(Box::new(blake3::Hasher::new())),
            DigestFunction::Sha1 => HashState::Sha1(sha1::Sha1::new()),
            DigestFunction::Md5 => HashState::Md5(md5::Md5::new()),
        };
        Hasher { state, size: 0 }
    }

    /// Feeds the next piece of the blob.
    pub fn update(&mut self, data: &[u8]) {
        match &mut self.state {
            HashState::Sha256(h) => h.update(data),
            HashState::Sha384(h) => h.update(data),
            HashState::Sha512(h) => h.update(data),
            HashState::Blake3(h) => {
                h.update(data);
            }
            HashState::Sha1(h) => h.update(data),
            HashState::Md5(h) => h.update(data),
        }
        self.size += data.len() as u64;
    }

    /// Bytes fed so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The digest of everything fed.
    pub fn finish(self) -> Digest {
        let size = self.size;
        let digest = match self.state {
            HashState::Sha256(h) => Digest::from_raw(DigestFunction::Sha256, &h.finalize(), size),
            HashState::Sha384(h) => Digest::from_raw(DigestFunction::Sha384, &h.finalize(), size),
            HashState::Sha512(h) => Digest::from_raw(DigestFunction::Sha512, &h.finalize(), size),
            HashState::Blake3(h) => {
                Digest::from_raw(DigestFunction::Blake3, h.finalize().as_bytes(), size)
            }
            HashState::Sha1(h) => Digest::from_raw(DigestFunction::Sha1, &h.finalize(), size),
            HashState::Md5(h) => Digest::from_raw(DigestFunction::Md5, &h.finalize(), size),
        };
        digest.expect("each function's output has the function's length")
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
mod tests;
