//! Origin request headers from the credential-bearing qualifiers Bazel
//! sends: `http_header:NAME` (every URI), `bazel.auth_headers` (Bazel < 6,
//! JSON `{uri: {header: value}}`) and `http_header_url:N:NAME` (URI N).
//! The values are credentials: never logged, never stored.

use std::collections::BTreeMap;

use bazel_remote_apis::build::bazel::remote::asset::v1::Qualifier;

use crate::error::clip;
use crate::error::{Error, Result};

/// `http_header:NAME`: a request header for every URI.
pub const HTTP_HEADER: &str = "http_header:";
/// `http_header_url:N:NAME`: a request header for URI number N.
pub const HTTP_HEADER_URL: &str = "http_header_url:";
/// Bazel < 6: JSON `{uri: {header: value}}`.
pub const AUTH_HEADERS: &str = "bazel.auth_headers";

/// Builds the origin request headers of each URI from the credential
/// qualifiers: `http_header:NAME` for all, `bazel.auth_headers` per URI,
/// then `http_header_url:N:NAME` for URI N, each later one replacing an
/// earlier header of the same name.
pub fn origin_headers(
    uris: &[String],
    qualifiers: &[Qualifier],
) -> Result<Vec<Vec<(String, String)>>> {
    let mut headers: Vec<BTreeMap<String, (String, String)>> = vec![BTreeMap::new(); uris.len()];
    let set = |map: &mut BTreeMap<String, (String, String)>, name: &str, value: &str| {
        map.insert(
            name.to_ascii_lowercase(),
            (name.to_string(), value.to_string()),
        );
    };
    for q in qualifiers {
        if let Some(name) = q.name.strip_prefix(HTTP_HEADER) {
            check_header_name(&q.name, name)?;
            for map in &mut headers {
                set(map, name, &q.value);
            }
        }
    }
    if let Some(q) = qualifiers.iter().find(|q| q.name == AUTH_HEADERS) {
        let parsed: BTreeMap<String, BTreeMap<String, String>> = serde_json::from_str(&q.value)
            .map_err(|e| {
                Error::InvalidArgument(format!(
                    "qualifier {AUTH_HEADERS} is not a JSON object of header objects: {e}"
                ))
            })?;
        for (uri, map) in uris.iter().zip(&mut headers) {
            for (name, value) in parsed.get(uri).into_iter().flatten() {
                check_header_name(AUTH_HEADERS, name)?;
                set(map, name, value);
            }
        }
    }
    for q in qualifiers {
        let Some(rest) = q.name.strip_prefix(HTTP_HEADER_URL) else {
            continue;
        };
        let (index, name) = rest
            .split_once(':')
            .and_then(|(i, name)| Some((i.parse::<usize>().ok()?, name)))
            .filter(|(i, _)| *i < uris.len())
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "qualifier {:?} must be http_header_url:<index of one of the {} URIs>:<header>",
                    clip(&q.name),
                    uris.len()
                ))
            })?;
        check_header_name(&q.name, name)?;
        set(&mut headers[index], name, &q.value);
    }
    Ok(headers
        .into_iter()
        .map(|map| map.into_values().collect())
        .collect())
}

fn check_header_name(qualifier: &str, name: &str) -> Result<()> {
    let valid = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if valid {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "qualifier {:?} does not name a valid HTTP header",
            clip(qualifier)
        )))
    }
}
