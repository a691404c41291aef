//! ByteStream resource names, parsed once at the service edge.
//!
//! Read:  `{instance}/blobs/{digest_function?}/{hash}/{size}`
//!        `{instance}/compressed-blobs/{compressor}/{digest_function?}/{hash}/{size}`
//! Write: `{instance}/uploads/{uuid}/blobs/…` or `…/uploads/{uuid}/compressed-blobs/…`,
//!        optionally followed by `/{metadata…}`.
//! The instance name may be empty or have several segments; it ends at the
//! first reserved word (`blobs`, `uploads`, `compressed-blobs`).

use crate::digest::{Digest, DigestFunction};
use crate::error::{Error, Result};

/// Words that cannot be instance-name segments (REAPI).
const RESERVED: &[&str] = &[
    "blobs",
    "uploads",
    "actions",
    "actionResults",
    "operations",
    "capabilities",
    "compressed-blobs",
];

/// A parsed ByteStream resource name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceName {
    /// The REAPI instance name (may be empty).
    pub instance: String,
    /// The blob the name refers to.
    pub digest: Digest,
    /// The client's upload id, for write names.
    pub upload_id: Option<String>,
    /// The compressor segment of `compressed-blobs` names (e.g. `zstd`).
    pub compressor: Option<String>,
}

impl ResourceName {
    /// Parses a `Read` resource name.
    pub fn parse_read(name: &str) -> Result<Self> {
        let segments: Vec<&str> = name.split('/').collect();
        let (instance, rest) = split_instance(name, &segments)?;
        if rest.first() == Some(&"uploads") {
            return Err(malformed(name, "a read name must not contain `uploads/`"));
        }
        let (parsed, tail) = parse_blob_part(name, instance, rest)?;
        if !tail.is_empty() {
            return Err(malformed(name, "unexpected segments after the size"));
        }
        Ok(parsed)
    }

    /// Parses a `Write` resource name (trailing metadata segments are allowed).
    pub fn parse_write(name: &str) -> Result<Self> {
        let segments: Vec<&str> = name.split('/').collect();
        let (instance, rest) = split_instance(name, &segments)?;
        match rest {
            ["uploads", uuid, blob_part @ ..] if !uuid.is_empty() => {
                let (mut parsed, _metadata) = parse_blob_part(name, instance, blob_part)?;
                parsed.upload_id = Some((*uuid).to_string());
                Ok(parsed)
            }
            _ => Err(malformed(
                name,
                "expected `{instance}/uploads/{uuid}/blobs/{hash}/{size}`",
            )),
        }
    }

    /// The name a client would use to read this blob (no upload id).
    pub fn read_name(&self) -> String {
        let blob = format!("blobs/{}/{}", self.digest.hash_hex(), self.digest.size);
        if self.instance.is_empty() {
            blob
        } else {
            format!("{}/{blob}", self.instance)
        }
    }
}

fn malformed(name: &str, why: &str) -> Error {
    Error::InvalidArgument(format!("malformed resource name {name:?}: {why}"))
}

/// Splits off the instance name: everything before the first reserved word.
fn split_instance<'a>(name: &str, segments: &'a [&'a str]) -> Result<(String, &'a [&'a str])> {
    let pos = segments
        .iter()
        .position(|s| matches!(*s, "blobs" | "uploads" | "compressed-blobs"))
        .ok_or_else(|| {
            malformed(
                name,
                "no `blobs/`, `compressed-blobs/` or `uploads/` segment",
            )
        })?;
    let instance_segments = &segments[..pos];
    if instance_segments.iter().any(|s| s.is_empty()) {
        return Err(malformed(name, "empty instance-name segment"));
    }
    if let Some(bad) = instance_segments.iter().find(|s| RESERVED.contains(s)) {
        return Err(malformed(
            name,
            &format!("`{bad}` is reserved and cannot be part of an instance name"),
        ));
    }
    Ok((instance_segments.join("/"), &segments[pos..]))
}

/// Parses `blobs/…/{hash}/{size}` or `compressed-blobs/{c}/…/{hash}/{size}`
/// and returns whatever follows the size.
fn parse_blob_part<'a>(
    name: &str,
    instance: String,
    rest: &'a [&'a str],
) -> Result<(ResourceName, &'a [&'a str])> {
    let (compressor, rest) = match rest {
        ["blobs", rest @ ..] => (None, rest),
        ["compressed-blobs", compressor, rest @ ..] => (Some((*compressor).to_string()), rest),
        _ => {
            return Err(malformed(
                name,
                "expected `blobs/` or `compressed-blobs/{compressor}/`",
            ));
        }
    };
    let (function, rest) = match rest
        .first()
        .map(|s| DigestFunction::from_resource_segment(s))
    {
        Some(Some(function)) => (function?, &rest[1..]),
        _ => (DigestFunction::Sha256, rest),
    };
    let [hash, size, tail @ ..] = rest else {
        return Err(malformed(name, "expected `{hash}/{size}`"));
    };
    let size: i64 = size.parse().map_err(|_| {
        malformed(
            name,
            &format!("size {size:?} is not a non-negative integer"),
        )
    })?;
    let digest =
        Digest::parse(function, hash, size).map_err(|e| malformed(name, &e.to_string()))?;
    Ok((
        ResourceName {
            instance,
            digest,
            upload_id: None,
            compressor,
        },
        tail,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn read_names() {
        let r = ResourceName::parse_read(&format!("blobs/{H}/0")).unwrap();
        assert_eq!(r.instance, "");
        let r = ResourceName::parse_read(&format!("a/b/c/blobs/{H}/0")).unwrap();
        assert_eq!(r.instance, "a/b/c");
        assert_eq!(r.read_name(), format!("a/b/c/blobs/{H}/0"));
        let r = ResourceName::parse_read(&format!("x/blobs/sha256/{H}/0")).unwrap();
        assert_eq!(r.instance, "x");
        let r = ResourceName::parse_read(&format!("compressed-blobs/zstd/{H}/0")).unwrap();
        assert_eq!(r.compressor.as_deref(), Some("zstd"));
    }

    #[test]
    fn write_names() {
        let w = ResourceName::parse_write(&format!("i/uploads/u-1/blobs/{H}/0/meta/data")).unwrap();
        assert_eq!(w.instance, "i");
        assert_eq!(w.upload_id.as_deref(), Some("u-1"));
        assert!(ResourceName::parse_write(&format!("uploads/u/blobs/{H}/0")).is_ok());
    }

    #[test]
    fn malformed_names() {
        for bad in [
            String::new(),
            "blobs".to_string(),
            format!("blobs/{H}"),
            format!("blobs/{H}/-1"),
            format!("blobs/{H}/x"),
            format!("blobs/{}/1", &H[..10]),
            format!("blobs/{H}/0/extra"),
            format!("a//blobs/{H}/0"),
            format!("actions/blobs/{H}/0"),
            format!("blobs/blake3/{H}/0"),
            format!("uploads/u/blobs/{H}/0"),
        ] {
            let err = ResourceName::parse_read(&bad).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{bad}: {err:?}");
        }
        for bad in [format!("blobs/{H}/0"), format!("uploads//blobs/{H}/0")] {
            assert!(ResourceName::parse_write(&bad).is_err(), "{bad}");
        }
    }
}
