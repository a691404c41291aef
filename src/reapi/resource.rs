//! ByteStream resource names: parsed once at the service edge, and formatted
//! here too (for calls to the upstream), so both directions agree.
//!
//! Read:  `{instance}/blobs/{digest_function?}/{hash}/{size}`
//!        `{instance}/compressed-blobs/{compressor}/{digest_function?}/{hash}/{size}`
//! Write: `{instance}/uploads/{uuid}/blobs/…` or `…/uploads/{uuid}/compressed-blobs/…`,
//!        optionally followed by `/{metadata…}`.
//! The instance name may be empty or have several segments; it ends at the
//! first reserved word (`blobs`, `uploads`, `compressed-blobs`). A
//! well-formed name with a compressor this server does not serve (anything
//! but `zstd`) parses to UNIMPLEMENTED, for every method alike; a malformed one to
//! INVALID_ARGUMENT (its echo clipped, see [`clip`]).
//!
//! Any other name (a Remote Logstream's `{parent}/logstreams/{id}`, its
//! write name, …) is not Outpost's to parse: [`is_cas_name`] tells the two
//! apart, and ByteStream passes the others through to the upstream.

use std::fmt;

use crate::compression::Compressor;
use crate::digest::{Digest, DigestFunction};
use crate::error::{Error, Result, clip};

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

/// The compressors whose `compressed-blobs/{compressor}/…` names this
/// server serves (those of [`Compressor::ALL`]). Checked while parsing, so
/// Read, Write and QueryWriteStatus give one answer for a name.
const SERVED_COMPRESSORS: &[&str] = &[Compressor::Zstd.name()];

/// The words that end the instance name of a CAS resource name.
const CAS_MARKERS: &[&str] = &["blobs", "uploads", "compressed-blobs"];

/// Whether `name` is a CAS resource name (read or write, well-formed or
/// not): it has a `blobs`, `compressed-blobs` or `uploads` segment. REAPI
/// reserves these words, so no instance name (hence no logstream parent)
/// contains them. A malformed CAS name (and the empty name, which names
/// nothing) is still the CAS's to reject with INVALID_ARGUMENT; every other
/// name belongs to another service (Remote Logstream) and is passed through
/// when there is an upstream.
pub fn is_cas_name(name: &str) -> bool {
    name.is_empty() || name.split('/').any(|s| CAS_MARKERS.contains(&s))
}

/// A ByteStream resource name: parsed from a client's request, or built
/// with [`ResourceName::read`] / [`ResourceName::upload`] and formatted with
/// `Display` for a request to the upstream.
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
    /// The name that reads `digest` from `instance`.
    pub fn read(instance: &str, digest: Digest) -> Self {
        ResourceName {
            instance: instance.to_string(),
            digest,
            upload_id: None,
            compressor: None,
        }
    }

    /// The name that uploads `digest` to `instance`; `upload_id` must be
    /// unique per upload and contain no `/`.
    pub fn upload(instance: &str, upload_id: &str, digest: Digest) -> Self {
        ResourceName {
            upload_id: Some(upload_id.to_string()),
            ..ResourceName::read(instance, digest)
        }
    }

    /// The same name in its `compressed-blobs/{compressor}/…` form.
    pub fn compressed(self, compressor: &str) -> Self {
        ResourceName {
            compressor: Some(compressor.to_string()),
            ..self
        }
    }

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

    /// The name a client would use to read this blob (no upload id, not
    /// compressed).
    pub fn read_name(&self) -> String {
        ResourceName::read(&self.instance, self.digest).to_string()
    }
}

/// Formats the name so that `parse_read` (or `parse_write`, for an upload)
/// gives it back.
impl fmt::Display for ResourceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.instance.is_empty() {
            write!(f, "{}/", self.instance)?;
        }
        if let Some(upload_id) = &self.upload_id {
            write!(f, "uploads/{upload_id}/")?;
        }
        match &self.compressor {
            Some(compressor) => write!(f, "compressed-blobs/{compressor}/")?,
            None => f.write_str("blobs/")?,
        }
        if let Some(segment) = function_segment(self.digest.function) {
            write!(f, "{segment}/")?;
        }
        write!(f, "{}/{}", self.digest.hash_hex(), self.digest.size)
    }
}

/// The digest-function segment of a name. REAPI says it MUST be omitted for
/// the functions a server can tell by hash length (MD5, SHA-1, SHA-256,
/// SHA-384, SHA-512), and be present for the newer ones (BLAKE3).
fn function_segment(function: DigestFunction) -> Option<&'static str> {
    (!function.known_by_length()).then(|| function.name())
}

/// The error for a malformed `name` (a client's string: clipped).
fn malformed(name: &str, why: &str) -> Error {
    Error::InvalidArgument(format!("malformed resource name {:?}: {why}", clip(name)))
}

/// Splits off the instance name: everything before the first reserved word.
fn split_instance<'a>(name: &str, segments: &'a [&'a str]) -> Result<(String, &'a [&'a str])> {
    let pos = segments
        .iter()
        .position(|s| CAS_MARKERS.contains(s))
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
        Some(Some(function)) => (Some(function?), &rest[1..]),
        _ => (None, rest),
    };
    let [hash, size, tail @ ..] = rest else {
        return Err(malformed(name, "expected `{hash}/{size}`"));
    };
    // Without a segment, the hash length says which function (REAPI); a
    // segment the spec says to omit is accepted all the same.
    let function = function
        .or_else(|| DigestFunction::by_hex_len(hash.len()))
        .unwrap_or(DigestFunction::Sha256);
    // Digits only: `parse` would also take `+5000`, a second spelling of
    // one name.
    let size: i64 = Some(size)
        .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            malformed(
                name,
                &format!("size {:?} is not a non-negative integer", clip(size)),
            )
        })?;
    let digest =
        Digest::parse(function, hash, size).map_err(|e| malformed(name, &e.to_string()))?;
    if let Some(c) = compressor
        .as_deref()
        .filter(|c| !SERVED_COMPRESSORS.contains(c))
    {
        if c == "identity" {
            // REAPI: the segment names a compressor "other than identity";
            // plain bytes are read and written under `blobs/`.
            return Err(malformed(
                name,
                "`compressed-blobs/identity` is not a form: use `blobs/`",
            ));
        }
        return Err(Error::Unimplemented(format!(
            "compressed-blobs ({}) are not supported: this server serves only zstd",
            clip(c)
        )));
    }
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
    }

    #[test]
    fn unserved_compressors_are_unimplemented_for_reads_and_writes_alike() {
        for name in [
            format!("compressed-blobs/deflate/{H}/0"),
            format!("i/uploads/u-1/compressed-blobs/brotli/{H}/0"),
            format!("a/b/uploads/u-1/compressed-blobs/deflate/{H}/0/meta"),
            format!("compressed-blobs/ZSTD/{H}/0"),
        ] {
            let parsed = if name.contains("/uploads/") {
                ResourceName::parse_write(&name)
            } else {
                ResourceName::parse_read(&name)
            };
            let err = parsed.unwrap_err();
            assert!(matches!(err, Error::Unimplemented(_)), "{name}: {err:?}");
        }
        // Malformed stays malformed, compressed or not.
        let err = ResourceName::parse_read(&format!("compressed-blobs/zstd/{H}/x")).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
    }

    #[test]
    fn every_digest_function_round_trips_and_only_blake3_has_a_segment() {
        for f in DigestFunction::ALL {
            let d = Digest::of(f, b"abc");
            let hex = d.hash_hex();
            let read = ResourceName::read("i", d);
            let upload = ResourceName::upload("i", "u-1", d);
            let segment = if f == DigestFunction::Blake3 {
                "blake3/"
            } else {
                ""
            };
            assert_eq!(read.to_string(), format!("i/blobs/{segment}{hex}/3"));
            assert_eq!(ResourceName::parse_read(&read.to_string()).unwrap(), read);
            assert_eq!(
                ResourceName::parse_write(&upload.to_string()).unwrap(),
                upload
            );
            // The segment the spec says to omit is accepted when present.
            let named = format!("i/blobs/{}/{hex}/3", f.name());
            assert_eq!(ResourceName::parse_read(&named).unwrap(), read, "{f:?}");
        }
        // Without the segment, a 64-hex hash is SHA-256; with it, BLAKE3:
        // the same hex names two different blobs.
        let hex = Digest::of(DigestFunction::Blake3, b"x").hash_hex();
        let plain = ResourceName::parse_read(&format!("blobs/{hex}/1")).unwrap();
        let blake3 = ResourceName::parse_read(&format!("blobs/blake3/{hex}/1")).unwrap();
        assert_eq!(plain.digest.function, DigestFunction::Sha256);
        assert_eq!(blake3.digest.function, DigestFunction::Blake3);
        // A segment the hash length does not match, or a function this
        // server lacks: INVALID_ARGUMENT.
        for name in [
            format!("blobs/sha512/{hex}/1"),
            format!("blobs/md5/{hex}/1"),
            format!("blobs/vso/{hex}/1"),
            format!("blobs/{}/1", &hex[..50]),
        ] {
            let err = ResourceName::parse_read(&name).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{name}: {err:?}");
        }
    }

    #[test]
    fn zstd_names_parse() {
        let r = ResourceName::parse_read(&format!("a/b/compressed-blobs/zstd/{H}/0")).unwrap();
        assert_eq!(
            (r.instance.as_str(), r.compressor.as_deref()),
            ("a/b", Some("zstd"))
        );
        let w =
            ResourceName::parse_write(&format!("uploads/u/compressed-blobs/zstd/{H}/0/m")).unwrap();
        assert_eq!(w.compressor.as_deref(), Some("zstd"));
        assert!(ResourceName::parse_read(&format!("compressed-blobs/{H}/0")).is_err());
        // Identity is no compressor: a malformed name, not an unserved one.
        let identity = ResourceName::parse_read(&format!("compressed-blobs/identity/{H}/0"));
        assert!(matches!(identity, Err(Error::InvalidArgument(_))));
        let deflate = ResourceName::parse_read(&format!("compressed-blobs/deflate/{H}/0"));
        assert!(matches!(deflate, Err(Error::Unimplemented(_))));
    }

    #[test]
    fn a_size_is_digits_only() {
        for size in ["+5", "-0", " 5", "5 ", "0x5", ""] {
            let name = format!("blobs/{H}/{size}");
            assert!(
                matches!(
                    ResourceName::parse_read(&name),
                    Err(Error::InvalidArgument(_))
                ),
                "{size:?}"
            );
        }
    }

    #[test]
    fn huge_names_are_not_echoed_whole() {
        let huge = format!("blobs/{}/1234", "a".repeat(10_000));
        let write = format!("uploads/u/blobs/{H}/{}", "9".repeat(10_000));
        for err in [
            ResourceName::parse_read(&huge).unwrap_err(),
            ResourceName::parse_write(&huge).unwrap_err(),
            ResourceName::parse_write(&write).unwrap_err(),
            ResourceName::parse_read(&format!("{}/blobs/{H}/0", "//".repeat(5000))).unwrap_err(),
        ] {
            assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
            assert!(
                err.to_string().len() < 1000,
                "{} bytes",
                err.to_string().len()
            );
        }
    }

    #[test]
    fn write_names() {
        let w = ResourceName::parse_write(&format!("i/uploads/u-1/blobs/{H}/0/meta/data")).unwrap();
        assert_eq!(w.instance, "i");
        assert_eq!(w.upload_id.as_deref(), Some("u-1"));
        assert!(ResourceName::parse_write(&format!("uploads/u/blobs/{H}/0")).is_ok());
    }

    fn sample() -> Digest {
        Digest::parse(DigestFunction::Sha256, H, 0).unwrap()
    }

    #[test]
    fn formats_names_the_upstream_expects() {
        let d = sample();
        assert_eq!(
            ResourceName::read("", d).to_string(),
            format!("blobs/{H}/0")
        );
        assert_eq!(
            ResourceName::read("a/b", d).to_string(),
            format!("a/b/blobs/{H}/0")
        );
        assert_eq!(
            ResourceName::upload("", "u-1", d).to_string(),
            format!("uploads/u-1/blobs/{H}/0")
        );
        assert_eq!(
            ResourceName::upload("a/b", "u-1", d)
                .compressed("zstd")
                .to_string(),
            format!("a/b/uploads/u-1/compressed-blobs/zstd/{H}/0")
        );
    }

    #[test]
    fn formatted_names_parse_back() {
        let d = sample();
        for instance in ["", "main", "a/b/c", "x/y-z"] {
            for compressor in [None, Some("zstd")] {
                let compress = |n: ResourceName| match compressor {
                    Some(c) => n.compressed(c),
                    None => n,
                };
                let name = compress(ResourceName::read(instance, d));
                assert_eq!(ResourceName::parse_read(&name.to_string()).unwrap(), name);
                assert!(ResourceName::parse_write(&name.to_string()).is_err());
                let name = compress(ResourceName::upload(instance, "u-1", d));
                assert_eq!(ResourceName::parse_write(&name.to_string()).unwrap(), name);
                assert!(ResourceName::parse_read(&name.to_string()).is_err());
            }
        }
    }

    #[test]
    fn cas_names_are_told_from_other_services_names() {
        for cas in [
            format!("blobs/{H}/0"),
            format!("a/b/blobs/{H}/0"),
            format!("i/compressed-blobs/zstd/{H}/0"),
            format!("i/uploads/u-1/blobs/{H}/0/meta"),
            "blobs/zzz/1".to_string(),
            "i/uploads/u-1".to_string(),
            "blobs".to_string(),
            String::new(),
        ] {
            assert!(is_cas_name(&cas), "{cas}");
        }
        for other in [
            "projects/123/logstreams/456-def",
            "projects/123/logstreams/456-def/789-ghi",
            "main/logstreams/build-1_stdout",
            "blobsx/y",
            "a/my-blobs/1",
        ] {
            assert!(!is_cas_name(other), "{other}");
        }
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
            format!("blobs/vso/{H}/0"),
            format!("blobs/blake3/{}/0", &H[..40]),
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
