//! Unit tests of digests, functions and hashing.

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
    for f in DigestFunction::ALL {
        assert_eq!(DigestFunction::from_proto(f.to_proto()).unwrap(), f);
        assert_eq!(DigestFunction::from_tag(f.tag()), Some(f));
        assert_eq!(
            DigestFunction::from_resource_segment(f.name()).map(|r| r.unwrap()),
            Some(f)
        );
    }
    assert_eq!(DigestFunction::Sha256.tag(), 1, "existing keys use tag 1");
    assert!(DigestFunction::from_proto(4).is_err(), "VSO");
    assert!(DigestFunction::from_proto(999).is_err());
    assert!(
        DigestFunction::from_resource_segment("vso")
            .unwrap()
            .is_err()
    );
    assert!(DigestFunction::from_resource_segment("abc").is_none());
}

#[test]
fn every_function_hashes_the_standard_test_vector() {
    let vectors = [
        (
            DigestFunction::Sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
        ),
        (
            DigestFunction::Sha384,
            "cb00753f45a35e8bb5a03d699ac65007272c32ab0eded1631a8b605a43ff5bed\
             8086072ba1e7cc2358baeca134c825a7",
        ),
        (
            DigestFunction::Sha512,
            "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a\
             2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f",
        ),
        (
            DigestFunction::Blake3,
            "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85",
        ),
        (
            DigestFunction::Sha1,
            "a9993e364706816aba3e25717850c26c9cd0d89d",
        ),
        (DigestFunction::Md5, "900150983cd24fb0d6963f7d28e17f72"),
    ];
    for (f, hex) in vectors {
        let d = Digest::of(f, b"abc");
        assert_eq!(d.hash_hex(), hex, "{f:?}");
        assert_eq!(Digest::parse(f, hex, 3).unwrap(), d);
        // Fed in pieces, the same digest.
        let mut h = Hasher::new(f);
        h.update(b"a");
        h.update(b"bc");
        assert_eq!(h.finish(), d);
    }
}

#[test]
fn blake3_and_sha256_digests_with_the_same_hex_differ() {
    let hex = Digest::of(DigestFunction::Blake3, b"x").hash_hex();
    let b = Digest::parse(DigestFunction::Blake3, &hex, 1).unwrap();
    let s = Digest::parse(DigestFunction::Sha256, &hex, 1).unwrap();
    assert_ne!(b, s);
}

#[test]
fn the_function_is_inferred_from_the_hash_length_unless_named() {
    let infer = |hex: &str| DigestFunction::for_request(0, Some(hex)).unwrap();
    for f in DigestFunction::ALL {
        let hex = Digest::of(f, b"x").hash_hex();
        let expected = if f == DigestFunction::Blake3 {
            DigestFunction::Sha256
        } else {
            f
        };
        assert_eq!(infer(&hex), expected, "{f:?}");
        assert_eq!(f.known_by_length(), f != DigestFunction::Blake3);
        // Named explicitly, the field wins.
        let named = DigestFunction::for_request(f.to_proto(), Some(&hex)).unwrap();
        assert_eq!(named, f);
    }
    assert_eq!(
        DigestFunction::for_request(0, None).unwrap(),
        DigestFunction::Sha256
    );
    assert_eq!(infer("abc"), DigestFunction::Sha256);
    assert!(DigestFunction::for_request(4, None).is_err());
    // A named function whose length the hash does not have: refused.
    let sha256 = Digest::of(DigestFunction::Sha256, b"x").hash_hex();
    let f = DigestFunction::for_request(DigestFunction::Sha512.to_proto(), Some(&sha256));
    assert!(Digest::parse(f.unwrap(), &sha256, 1).is_err());
}
