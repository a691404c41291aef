//! Digests in every REAPI digest function Outpost serves, computed here with
//! the hash crates themselves (never with the code under test), and the
//! ByteStream names that carry them.

use re::digest_function::Value as DigestFunction;
use sha2::Digest as _;

use crate::re;

/// Every function Outpost serves, SHA-256 first.
pub const FUNCTIONS: [DigestFunction; 6] = [
    DigestFunction::Sha256,
    DigestFunction::Sha384,
    DigestFunction::Sha512,
    DigestFunction::Blake3,
    DigestFunction::Sha1,
    DigestFunction::Md5,
];

/// Lower-case hex hash of `data` under `function`; `None` for a function
/// the test kit cannot compute.
pub fn try_hash_hex(function: DigestFunction, data: &[u8]) -> Option<String> {
    Some(match function {
        DigestFunction::Sha256 => hex::encode(sha2::Sha256::digest(data)),
        DigestFunction::Sha384 => hex::encode(sha2::Sha384::digest(data)),
        DigestFunction::Sha512 => hex::encode(sha2::Sha512::digest(data)),
        DigestFunction::Blake3 => blake3::hash(data).to_hex().to_string(),
        DigestFunction::Sha1 => hex::encode(sha1::Sha1::digest(data)),
        DigestFunction::Md5 => hex::encode(md5::Md5::digest(data)),
        _ => return None,
    })
}

/// Lower-case hex hash of `data` under one of [`FUNCTIONS`].
pub fn hash_hex(function: DigestFunction, data: &[u8]) -> String {
    try_hash_hex(function, data)
        .unwrap_or_else(|| panic!("the test kit cannot hash {}", function.as_str_name()))
}

/// The REAPI digest of `data` under `function`.
pub fn digest_in(function: DigestFunction, data: &[u8]) -> re::Digest {
    re::Digest {
        hash: hash_hex(function, data),
        size_bytes: data.len() as i64,
    }
}

/// The function a hex hash of `len` characters implies when a request
/// names none (REAPI: MD5, SHA-1, SHA-256, SHA-384, SHA-512 by length).
pub fn by_hex_len(len: usize) -> Option<DigestFunction> {
    match len {
        32 => Some(DigestFunction::Md5),
        40 => Some(DigestFunction::Sha1),
        64 => Some(DigestFunction::Sha256),
        96 => Some(DigestFunction::Sha384),
        128 => Some(DigestFunction::Sha512),
        _ => None,
    }
}

/// The digest-function segment of resource names (with its `/`): present
/// only for functions a hash length cannot name (BLAKE3).
pub fn segment(function: DigestFunction) -> String {
    match function {
        DigestFunction::Blake3 => "blake3/".to_string(),
        _ => String::new(),
    }
}

/// `{instance}/blobs/{segment}{hash}/{size}`.
pub fn read_name_in(instance: &str, function: DigestFunction, d: &re::Digest) -> String {
    let prefix = if instance.is_empty() {
        String::new()
    } else {
        format!("{instance}/")
    };
    format!(
        "{prefix}blobs/{}{}/{}",
        segment(function),
        d.hash,
        d.size_bytes
    )
}

/// `{instance}/uploads/{uuid}/blobs/{segment}{hash}/{size}`.
pub fn write_name_in(
    instance: &str,
    uuid: &str,
    function: DigestFunction,
    d: &re::Digest,
) -> String {
    let prefix = if instance.is_empty() {
        String::new()
    } else {
        format!("{instance}/")
    };
    format!(
        "{prefix}uploads/{uuid}/blobs/{}{}/{}",
        segment(function),
        d.hash,
        d.size_bytes
    )
}
