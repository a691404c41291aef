//! A Remote Asset request, validated once at the service edge: URIs,
//! qualifiers split into the key-forming ones and the credential-bearing
//! ones, checksums, and the origin request headers per URI.
//!
//! Credential-bearing qualifiers (`http_header:*`, `http_header_url:*`,
//! `bazel.auth_headers`) never reach a key, a record, a log line or a
//! response: they are kept only to build origin headers and to forward the
//! request to an upstream that may need them. `Debug` hides them.

use std::collections::HashSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bazel_remote_apis::build::bazel::remote::asset::v1::Qualifier;
use bazel_remote_apis::google::protobuf::{Any, Timestamp};
use sha2::{Digest as _, Sha256};
use tonic::Code;

use crate::asset::headers::{AUTH_HEADERS, HTTP_HEADER, HTTP_HEADER_URL, origin_headers};
use crate::asset::sri::Sri;
use crate::digest::DigestFunction;
use crate::error::{Error, Result, clip};
use crate::store::asset_index::{AssetKey, AssetKind};

/// The standard qualifier carrying SRI checksums.
pub const CHECKSUM_SRI: &str = "checksum.sri";
/// Bazel's canonical id of a download (a cache-busting string).
pub const CANONICAL_ID: &str = "bazel.canonical_id";
/// Whether a qualifier carries credentials (never keyed, stored or logged).
pub fn is_credential(name: &str) -> bool {
    name.starts_with(HTTP_HEADER) || name.starts_with(HTTP_HEADER_URL) || name == AUTH_HEADERS
}

/// Unix seconds now.
pub fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// A validated Fetch or Push request (the parts both share).
#[derive(Clone)]
pub struct AssetRequest {
    /// The client's instance name.
    pub instance: String,
    /// The URIs, in the client's order (at least one).
    pub uris: Vec<String>,
    /// The qualifiers that form the key, credentials removed, sorted.
    pub qualifiers: Vec<(String, String)>,
    /// The digest function of every digest in the request and the answer.
    pub digest_function: DigestFunction,
    /// The `checksum.sri` values, if given.
    pub checksums: Vec<Sri>,
    /// Fetch: bound on an origin download, if given.
    pub timeout: Option<Duration>,
    /// Fetch: content stored before this (unix seconds, rounded up) is not
    /// accepted.
    pub oldest_content_accepted: Option<i64>,
    /// Every qualifier as the client sent it, credentials included: only for
    /// forwarding to the upstream.
    forwarded: Vec<Qualifier>,
    /// Origin request headers per URI (same order as `uris`).
    headers: Vec<Vec<(String, String)>>,
}

impl std::fmt::Debug for AssetRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AssetRequest")
            .field("instance", &self.instance)
            .field("uris", &self.uris.len())
            .field("qualifiers", &self.qualifiers)
            .finish_non_exhaustive()
    }
}

impl AssetRequest {
    /// Validates the parts every asset request has. A malformed request is
    /// INVALID_ARGUMENT; duplicate qualifier names carry a BadRequest detail.
    pub fn parse(
        instance: String,
        uris: Vec<String>,
        qualifiers: Vec<Qualifier>,
        digest_function: i32,
    ) -> Result<Self> {
        if uris.is_empty() {
            return Err(Error::InvalidArgument(
                "at least one URI is required".into(),
            ));
        }
        if let Some(i) = uris.iter().position(String::is_empty) {
            return Err(Error::InvalidArgument(format!("uris[{i}] is empty")));
        }
        let digest_function = DigestFunction::from_proto(digest_function)?;
        let mut seen = HashSet::new();
        for q in &qualifiers {
            if !seen.insert(q.name.as_str()) {
                return Err(duplicate_qualifier(&q.name));
            }
        }
        let mut keyed = Vec::new();
        let mut checksums = Vec::new();
        for q in &qualifiers {
            if is_credential(&q.name) {
                continue;
            }
            if q.name == CHECKSUM_SRI {
                checksums = Sri::parse_list(&q.value)?;
            }
            keyed.push((q.name.clone(), q.value.clone()));
        }
        keyed.sort();
        let headers = origin_headers(&uris, &qualifiers)?;
        Ok(AssetRequest {
            instance,
            uris,
            qualifiers: keyed,
            digest_function,
            checksums,
            timeout: None,
            oldest_content_accepted: None,
            forwarded: qualifiers,
            headers,
        })
    }

    /// Sets the Fetch-only fields: `timeout` and `oldest_content_accepted`.
    pub fn with_fetch_limits(
        mut self,
        timeout: Option<&bazel_remote_apis::google::protobuf::Duration>,
        oldest: Option<&Timestamp>,
    ) -> Result<Self> {
        if let Some(t) = timeout {
            if t.seconds < 0 || t.nanos < 0 {
                return Err(Error::InvalidArgument(
                    "timeout must not be negative".into(),
                ));
            }
            let timeout = Duration::new(t.seconds as u64, t.nanos.clamp(0, 999_999_999) as u32);
            self.timeout = (!timeout.is_zero()).then_some(timeout);
        }
        self.oldest_content_accepted = oldest.map(|t| t.seconds + i64::from(t.nanos > 0));
        Ok(self)
    }

    /// The index key of each URI, in order.
    pub fn keys(&self) -> Vec<AssetKey> {
        self.uris.iter().map(|uri| self.key(uri)).collect()
    }

    /// The key of one URI (in the request's digest function).
    pub fn key(&self, uri: &str) -> AssetKey {
        AssetKey::of_function(self.digest_function, &self.instance, uri, &self.qualifiers)
    }

    /// The key-forming qualifiers as protos (what records and answers hold).
    pub fn stored_qualifiers(&self) -> Vec<Qualifier> {
        self.qualifiers
            .iter()
            .map(|(name, value)| Qualifier {
                name: name.clone(),
                value: value.clone(),
            })
            .collect()
    }

    /// Every qualifier as sent, credentials included (for the upstream only).
    pub fn forwarded_qualifiers(&self) -> Vec<Qualifier> {
        self.forwarded.clone()
    }

    /// Origin request headers for each URI (credentials: never log them).
    pub fn origin_headers(&self) -> Vec<Vec<(String, String)>> {
        self.headers.clone()
    }

    /// Whether Outpost understands every key-forming qualifier well enough
    /// to download the content itself (anything else, such as
    /// `resource_type` or `vcs.commit`, asks for more than bytes at a URL).
    pub fn origin_can_honour(&self) -> bool {
        self.qualifiers
            .iter()
            .all(|(name, _)| name == CHECKSUM_SRI || name == CANONICAL_ID)
    }

    /// The hashes the checksums name in the request's digest function, for
    /// a CAS lookup.
    pub fn checksums_in_function(&self) -> Vec<&[u8]> {
        self.checksums
            .iter()
            .filter_map(|s| s.hash_for(self.digest_function))
            .collect()
    }

    /// Identifies identical fetches (same kind, digest function, instance,
    /// URIs in order and qualifiers, credentials aside), so they share one
    /// flight.
    pub fn flight_key(&self, kind: AssetKind) -> [u8; 32] {
        let mut hasher = Sha256::new();
        let mut field = |bytes: &[u8]| {
            hasher.update((bytes.len() as u64).to_be_bytes());
            hasher.update(bytes);
        };
        field(&(kind as i32).to_be_bytes());
        field(&self.digest_function.to_proto().to_be_bytes());
        field(self.instance.as_bytes());
        field(&(self.uris.len() as u64).to_be_bytes());
        for uri in &self.uris {
            field(uri.as_bytes());
        }
        for (name, value) in &self.qualifiers {
            field(name.as_bytes());
            field(value.as_bytes());
        }
        hasher.finalize().into()
    }
}

/// Unix seconds of a proto timestamp (0 when absent: "never").
pub fn timestamp_secs(t: Option<&Timestamp>) -> i64 {
    t.map_or(0, |t| t.seconds)
}

/// A proto timestamp of unix seconds, or `None` for 0 ("never").
pub fn timestamp(secs: i64) -> Option<Timestamp> {
    (secs != 0).then_some(Timestamp {
        seconds: secs,
        nanos: 0,
    })
}

/// `google.rpc.BadRequest` (not in the generated crate).
#[derive(Clone, PartialEq, prost::Message)]
pub struct BadRequest {
    /// What is wrong, field by field.
    #[prost(message, repeated, tag = "1")]
    pub field_violations: Vec<FieldViolation>,
}

/// One `google.rpc.BadRequest.FieldViolation`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct FieldViolation {
    /// The offending field's path.
    #[prost(string, tag = "1")]
    pub field: String,
    /// Why it is wrong.
    #[prost(string, tag = "2")]
    pub description: String,
}

/// INVALID_ARGUMENT for a qualifier name given twice, with the BadRequest
/// detail the Remote Asset spec asks for.
fn duplicate_qualifier(name: &str) -> Error {
    use prost::Message as _;
    let description = format!("{:?} is given more than once", clip(name));
    let detail = BadRequest {
        field_violations: vec![FieldViolation {
            field: "qualifiers.name".into(),
            description: description.clone(),
        }],
    };
    Error::with_details(
        Code::InvalidArgument,
        format!("qualifier {description}"),
        vec![Any {
            type_url: "type.googleapis.com/google.rpc.BadRequest".into(),
            value: detail.encode_to_vec(),
        }],
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    fn q(name: &str, value: &str) -> Qualifier {
        Qualifier {
            name: name.into(),
            value: value.into(),
        }
    }

    fn uris(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn no_uris_and_bad_digest_functions_are_invalid_arguments() {
        let err = AssetRequest::parse("".into(), vec![], vec![], 0).unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        let err = AssetRequest::parse("".into(), uris(&["a"]), vec![], 7).unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        let err = AssetRequest::parse("".into(), uris(&["a", ""]), vec![], 0).unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
    }

    #[test]
    fn duplicate_names_carry_a_bad_request_detail() {
        let err = AssetRequest::parse(
            "".into(),
            uris(&["a"]),
            vec![q("x", "1"), q("y", "2"), q("x", "3")],
            0,
        )
        .unwrap_err();
        let status = tonic::Status::from(err);
        assert_eq!(status.code(), Code::InvalidArgument);
        let body = bazel_remote_apis::google::rpc::Status::decode(status.details()).unwrap();
        assert_eq!(
            body.details[0].type_url,
            "type.googleapis.com/google.rpc.BadRequest"
        );
        let detail = BadRequest::decode(body.details[0].value.as_slice()).unwrap();
        assert_eq!(detail.field_violations[0].field, "qualifiers.name");
        assert_eq!(
            detail.field_violations[0].description,
            "\"x\" is given more than once"
        );
    }

    #[test]
    fn credentials_are_split_off_and_never_keyed() {
        let plain = AssetRequest::parse(
            "i".into(),
            uris(&["https://a/x"]),
            vec![q("b", "2"), q("a", "1")],
            0,
        )
        .unwrap();
        let with_secrets = AssetRequest::parse(
            "i".into(),
            uris(&["https://a/x"]),
            vec![
                q("a", "1"),
                q("http_header:Authorization", "secret"),
                q("http_header_url:0:X-Token", "secret"),
                q("bazel.auth_headers", r#"{"https://a/x": {"A": "secret"}}"#),
                q("b", "2"),
            ],
            0,
        )
        .unwrap();
        assert_eq!(plain.keys(), with_secrets.keys());
        assert_eq!(
            with_secrets.qualifiers,
            vec![("a".into(), "1".into()), ("b".into(), "2".into())]
        );
        assert!(!format!("{with_secrets:?}").contains("secret"));
        assert_eq!(
            plain.flight_key(AssetKind::Blob),
            with_secrets.flight_key(AssetKind::Blob)
        );
        assert_ne!(
            plain.flight_key(AssetKind::Blob),
            plain.flight_key(AssetKind::Directory)
        );
        assert_eq!(with_secrets.forwarded_qualifiers().len(), 5);
    }

    #[test]
    fn keys_and_flights_differ_per_digest_function() {
        let parse = |f: DigestFunction| {
            AssetRequest::parse("i".into(), uris(&["https://a/x"]), vec![], f.to_proto()).unwrap()
        };
        let (sha256, blake3) = (parse(DigestFunction::Sha256), parse(DigestFunction::Blake3));
        assert_eq!(sha256.keys(), vec![AssetKey::of("i", "https://a/x", &[])]);
        assert_ne!(sha256.keys(), blake3.keys());
        assert_ne!(
            sha256.flight_key(AssetKind::Blob),
            blake3.flight_key(AssetKind::Blob)
        );
    }

    #[test]
    fn origin_headers_follow_precedence_per_uri() {
        let request = AssetRequest::parse(
            "".into(),
            uris(&["https://a/x", "https://b/x"]),
            vec![
                q("http_header_url:1:Authorization", "Bearer b"),
                q("http_header:Authorization", "Bearer all"),
                q("http_header:Accept", "*/*"),
                q(
                    "bazel.auth_headers",
                    r#"{"https://a/x": {"authorization": "Basic a"}}"#,
                ),
            ],
            0,
        )
        .unwrap();
        let headers = request.origin_headers();
        assert_eq!(
            headers[0],
            vec![
                ("Accept".to_string(), "*/*".to_string()),
                ("authorization".to_string(), "Basic a".to_string()),
            ]
        );
        assert_eq!(
            headers[1],
            vec![
                ("Accept".to_string(), "*/*".to_string()),
                ("Authorization".to_string(), "Bearer b".to_string()),
            ]
        );
    }

    #[test]
    fn malformed_credential_qualifiers_are_invalid_arguments() {
        for bad in [
            q("bazel.auth_headers", "{not json"),
            q("http_header_url:5:Authorization", "x"),
            q("http_header_url:x:Authorization", "x"),
            q("http_header:", "x"),
            q("http_header:Bad Name", "x"),
        ] {
            let err =
                AssetRequest::parse("".into(), uris(&["https://a/x"]), vec![bad], 0).unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{err}");
            assert!(!err.to_string().contains("Bearer"));
        }
    }

    #[test]
    fn fetch_limits_and_origin_qualifiers() {
        let request = AssetRequest::parse(
            "".into(),
            uris(&["https://a/x"]),
            vec![q(CANONICAL_ID, "c")],
            0,
        )
        .unwrap()
        .with_fetch_limits(
            Some(&bazel_remote_apis::google::protobuf::Duration {
                seconds: 3,
                nanos: 0,
            }),
            Some(&Timestamp {
                seconds: 100,
                nanos: 5,
            }),
        )
        .unwrap();
        assert_eq!(request.timeout, Some(Duration::from_secs(3)));
        assert_eq!(request.oldest_content_accepted, Some(101));
        assert!(request.origin_can_honour());
        let typed = AssetRequest::parse(
            "".into(),
            uris(&["https://a/x"]),
            vec![q("resource_type", "application/x-git")],
            0,
        )
        .unwrap();
        assert!(!typed.origin_can_honour());
    }
}
