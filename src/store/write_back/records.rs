//! The upload queue's durable records (column family `uploads` of the
//! local store): their byte layout, and nothing else.
//!
//! - A queued blob: key `b` · digest · instance name, value `1` · queued
//!   at (unix milliseconds, u64 BE).
//! - A queued action result: key `r` · action digest · instance name, value
//!   `1` · queued at · count (u32 BE) · that many digests (the blobs it
//!   waits for) · the encoded, stripped ActionResult.
//!
//! Digests are laid out as in the store's own keys ([`push_digest`]: their
//! length follows from their function tag); the
//! instance name comes last so it can be any length. The leading `1` is the
//! record version: a record this build cannot read is dropped at start-up.

use bazel_remote_apis::build::bazel::remote::execution::v2::ActionResult;
use prost::Message;

use crate::digest::Digest;
use crate::store::ActionKey;
use crate::store::local::{digest_len, parse_digest, push_digest};

const BLOB: u8 = b'b';
const RESULT: u8 = b'r';
const VERSION: u8 = 1;

/// One record read back at start-up.
#[derive(Debug, PartialEq)]
pub enum Record {
    /// A blob to upload for an instance name.
    Blob {
        /// The instance name it was written under.
        instance: String,
        /// The blob.
        digest: Digest,
        /// When it was queued (unix milliseconds).
        since: u64,
    },
    /// An action result to forward once its blobs are up.
    Result {
        /// Where it goes.
        key: ActionKey,
        /// When it was queued (unix milliseconds).
        since: u64,
        /// The blobs it waited for when queued.
        after: Vec<Digest>,
        /// The result, stripped.
        result: Box<ActionResult>,
    },
}

/// The key of a queued blob.
pub fn blob_key(instance: &str, digest: &Digest) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + digest_len(digest) + instance.len());
    key.push(BLOB);
    push_digest(&mut key, digest);
    key.extend_from_slice(instance.as_bytes());
    key
}

/// The value of a queued blob.
pub fn blob_value(since: u64) -> Vec<u8> {
    let mut value = Vec::with_capacity(9);
    value.push(VERSION);
    value.extend_from_slice(&since.to_be_bytes());
    value
}

/// The key of a queued action result.
pub fn result_key(key: &ActionKey) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + digest_len(&key.action) + key.instance.len());
    out.push(RESULT);
    push_digest(&mut out, &key.action);
    out.extend_from_slice(key.instance.as_bytes());
    out
}

/// The value of a queued action result.
pub fn result_value(since: u64, after: &[Digest], result: &ActionResult) -> Vec<u8> {
    let digests: usize = after.iter().map(digest_len).sum();
    let mut value = Vec::with_capacity(13 + digests + result.encoded_len());
    value.push(VERSION);
    value.extend_from_slice(&since.to_be_bytes());
    value.extend_from_slice(&(after.len() as u32).to_be_bytes());
    for digest in after {
        push_digest(&mut value, digest);
    }
    result.encode(&mut value).expect("a Vec grows as needed");
    value
}

/// Reads a record back; `Err` says why it cannot be (the caller drops it).
pub fn parse(key: &[u8], value: &[u8]) -> Result<Record, String> {
    let (&kind, rest) = key.split_first().ok_or("empty key")?;
    let (digest, rest) = parse_digest(rest).ok_or("bad digest in key")?;
    let instance = std::str::from_utf8(rest)
        .map_err(|_| "instance name is not UTF-8")?
        .to_string();
    if value.first() != Some(&VERSION) || value.len() < 9 {
        return Err("unknown record version".into());
    }
    let since = u64::from_be_bytes(value[1..9].try_into().expect("8 bytes"));
    match kind {
        BLOB if value.len() == 9 => Ok(Record::Blob {
            instance,
            digest,
            since,
        }),
        RESULT => {
            let count = value.get(9..13).ok_or("truncated result record")?;
            let count = u32::from_be_bytes(count.try_into().expect("4 bytes")) as usize;
            // Digests vary in length: read them one by one (a count larger
            // than the value holds fails at the first missing digest).
            let mut after = Vec::new();
            let mut rest = &value[13..];
            for _ in 0..count {
                let (digest, tail) = parse_digest(rest).ok_or("bad digest in result record")?;
                after.push(digest);
                rest = tail;
            }
            let result = ActionResult::decode(rest)
                .map_err(|e| format!("undecodable action result: {e}"))?;
            let result = Box::new(result);
            Ok(Record::Result {
                key: ActionKey {
                    instance,
                    action: digest,
                },
                since,
                after,
                result,
            })
        }
        _ => Err("unknown record kind".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::DigestFunction;

    #[test]
    fn records_round_trip() {
        let d = Digest::of(DigestFunction::Sha256, b"x");
        let e = Digest::of(DigestFunction::Sha256, b"y");
        assert_eq!(
            parse(&blob_key("a/b", &d), &blob_value(77)),
            Ok(Record::Blob {
                instance: "a/b".into(),
                digest: d,
                since: 77
            })
        );
        let key = ActionKey {
            instance: String::new(),
            action: e,
        };
        let result = ActionResult {
            exit_code: 3,
            ..Default::default()
        };
        assert_eq!(
            parse(&result_key(&key), &result_value(5, &[d, e], &result)),
            Ok(Record::Result {
                key,
                since: 5,
                after: vec![d, e],
                result: Box::new(result)
            })
        );
    }

    #[test]
    fn records_of_every_digest_function_round_trip() {
        let after: Vec<Digest> = DigestFunction::ALL
            .iter()
            .map(|&f| Digest::of(f, b"out"))
            .collect();
        for f in DigestFunction::ALL {
            let d = Digest::of(f, b"x");
            let key = ActionKey {
                instance: "i".into(),
                action: d,
            };
            let result = ActionResult::default();
            assert_eq!(
                parse(&result_key(&key), &result_value(5, &after, &result)),
                Ok(Record::Result {
                    key,
                    since: 5,
                    after: after.clone(),
                    result: Box::new(result)
                })
            );
            assert!(matches!(
                parse(&blob_key("i", &d), &blob_value(1)),
                Ok(Record::Blob { digest, .. }) if digest == d
            ));
        }
    }

    #[test]
    fn damaged_records_are_refused() {
        let d = Digest::of(DigestFunction::Sha256, b"x");
        let key = result_key(&ActionKey {
            instance: "i".into(),
            action: d,
        });
        let good = result_value(5, &[d], &ActionResult::default());
        assert!(parse(&key, &good).is_ok());
        assert!(parse(&key, &good[..20]).is_err());
        let mut huge_count = good.clone();
        huge_count[9..13].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse(&key, &huge_count).is_err());
        let mut other_version = good;
        other_version[0] = 2;
        assert!(parse(&key, &other_version).is_err());
        assert!(parse(&blob_key("i", &d), &blob_value(1)[..8]).is_err());
        assert!(parse(b"x", &blob_value(1)).is_err());
        let mut unknown = blob_key("i", &d);
        unknown[0] = b'z';
        assert!(parse(&unknown, &blob_value(1)).is_err());
        let mut bad_name = blob_key("i", &d);
        bad_name.push(0xff);
        assert!(parse(&bad_name, &blob_value(1)).is_err());
    }
}
