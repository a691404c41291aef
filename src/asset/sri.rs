//! Subresource Integrity values (`checksum.sri`): `sha256-<base64>`,
//! `sha384-…`, `sha512-…`, several separated by whitespace; content matches
//! when it matches any one of them.

use base64::Engine as _;
use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};

use crate::digest::{DigestFunction, Hasher};
use crate::error::{Error, Result};

/// Standard base64, with or without the trailing `=` padding (both occur in
/// the wild).
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// How much of a client's value an error message repeats.
const ECHO_LIMIT: usize = 200;

/// A hash algorithm SRI values may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SriAlgorithm {
    /// `sha256-`
    Sha256,
    /// `sha384-`
    Sha384,
    /// `sha512-`
    Sha512,
}

impl SriAlgorithm {
    /// The algorithm a value's prefix names (ASCII case ignored), if supported.
    fn from_prefix(prefix: &str) -> Option<Self> {
        match prefix.to_ascii_lowercase().as_str() {
            "sha256" => Some(SriAlgorithm::Sha256),
            "sha384" => Some(SriAlgorithm::Sha384),
            "sha512" => Some(SriAlgorithm::Sha512),
            _ => None,
        }
    }

    /// The digest function that computes it (hashing is done by
    /// [`Hasher`], as everywhere else).
    pub fn function(self) -> DigestFunction {
        match self {
            SriAlgorithm::Sha256 => DigestFunction::Sha256,
            SriAlgorithm::Sha384 => DigestFunction::Sha384,
            SriAlgorithm::Sha512 => DigestFunction::Sha512,
        }
    }

    /// Number of hash bytes.
    fn hash_len(self) -> usize {
        self.function().hash_len()
    }
}

/// One SRI value.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Sri {
    /// Its algorithm.
    pub algorithm: SriAlgorithm,
    /// The expected hash.
    pub hash: Vec<u8>,
}

impl Sri {
    /// Parses a `checksum.sri` qualifier value. INVALID_ARGUMENT when no
    /// value uses a supported algorithm or one is malformed. Values with an
    /// algorithm Outpost does not know (`sha1-…`) are skipped.
    pub fn parse_list(value: &str) -> Result<Vec<Sri>> {
        let mut out = Vec::new();
        let mut skipped = 0;
        for token in value.split_ascii_whitespace() {
            // The SRI grammar allows `?options` after the hash; none matter here.
            let token = token.split('?').next().unwrap_or(token);
            let Some((prefix, encoded)) = token.split_once('-') else {
                return Err(invalid(value, "a value must look like sha256-<base64>"));
            };
            let Some(algorithm) = SriAlgorithm::from_prefix(prefix) else {
                skipped += 1;
                continue;
            };
            let hash = BASE64
                .decode(encoded)
                .map_err(|_| invalid(value, &format!("the {prefix} hash is not valid base64")))?;
            if hash.len() != algorithm.hash_len() {
                return Err(invalid(
                    value,
                    &format!(
                        "a {prefix} hash has {} bytes, this one has {}",
                        algorithm.hash_len(),
                        hash.len()
                    ),
                ));
            }
            let sri = Sri { algorithm, hash };
            if !out.contains(&sri) {
                out.push(sri);
            }
        }
        if out.is_empty() {
            let why = if skipped > 0 {
                "no value uses a supported algorithm (sha256, sha384, sha512)"
            } else {
                "it holds no value"
            };
            return Err(invalid(value, why));
        }
        Ok(out)
    }

    /// The hash, when the value uses `function`: for looking the content
    /// up in a CAS of that function.
    pub fn hash_for(&self, function: DigestFunction) -> Option<&[u8]> {
        (self.algorithm.function() == function).then_some(self.hash.as_slice())
    }
}

/// The INVALID_ARGUMENT for a bad `checksum.sri`, repeating at most
/// [`ECHO_LIMIT`] characters of what the client sent.
fn invalid(value: &str, why: &str) -> Error {
    let shown: String = value.chars().take(ECHO_LIMIT).collect();
    let more = if shown.len() < value.len() { "…" } else { "" };
    Error::InvalidArgument(format!(
        "qualifier checksum.sri {shown:?}{more} is invalid: {why}"
    ))
}

/// Hashes content as it streams by with every algorithm the values use
/// (each once, however many values use it).
pub struct SriVerifier {
    /// The values to match.
    expected: Vec<Sri>,
    /// One running hash per function some value uses.
    hashers: Vec<Hasher>,
}

impl SriVerifier {
    /// A verifier for `expected` (empty: everything matches).
    pub fn new(expected: &[Sri]) -> Self {
        let mut functions: Vec<DigestFunction> =
            expected.iter().map(|s| s.algorithm.function()).collect();
        functions.sort();
        functions.dedup();
        SriVerifier {
            expected: expected.to_vec(),
            hashers: functions.into_iter().map(Hasher::new).collect(),
        }
    }

    /// Feeds the next bytes.
    pub fn update(&mut self, data: &[u8]) {
        for h in &mut self.hashers {
            h.update(data);
        }
    }

    /// Whether the content matched at least one expected value.
    pub fn matches(self) -> bool {
        if self.expected.is_empty() {
            return true;
        }
        let actual: Vec<_> = self.hashers.into_iter().map(Hasher::finish).collect();
        self.expected.iter().any(|sri| {
            actual
                .iter()
                .any(|d| sri.hash_for(d.function) == Some(d.hash_bytes()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::Digest;

    /// The SRI value of `data` for `algorithm`.
    fn sri_of(algorithm: &str, data: &[u8]) -> String {
        let function = SriAlgorithm::from_prefix(algorithm).unwrap().function();
        let hash = Digest::of(function, data).hash_bytes().to_vec();
        format!(
            "{algorithm}-{}",
            base64::engine::general_purpose::STANDARD.encode(hash)
        )
    }

    fn verify(list: &[Sri], data: &[u8]) -> bool {
        let mut v = SriVerifier::new(list);
        for piece in data.chunks(3) {
            v.update(piece);
        }
        v.matches()
    }

    #[test]
    fn each_algorithm_parses_and_verifies() {
        for alg in ["sha256", "sha384", "sha512"] {
            let list = Sri::parse_list(&sri_of(alg, b"hello")).unwrap();
            assert_eq!(list.len(), 1);
            assert!(verify(&list, b"hello"), "{alg}");
            assert!(!verify(&list, b"hellO"), "{alg}");
        }
    }

    #[test]
    fn one_matching_value_of_several_suffices() {
        let value = format!(
            "  {}\t{} \n{} ",
            sri_of("sha512", b"other"),
            sri_of("sha256", b"other"),
            sri_of("sha384", b"data"),
        );
        let list = Sri::parse_list(&value).unwrap();
        assert_eq!(list.len(), 3);
        assert!(verify(&list, b"data"));
        assert!(verify(&list, b"other"));
        assert!(!verify(&list, b"neither"));
    }

    #[test]
    fn unknown_algorithms_are_skipped_beside_a_known_one() {
        let value = format!("sha1-AAAA md5-!!! {}", sri_of("sha256", b"x"));
        let list = Sri::parse_list(&value).unwrap();
        assert_eq!(list.len(), 1);
        let sha256 = Digest::of(DigestFunction::Sha256, b"x");
        assert_eq!(
            list[0].hash_for(DigestFunction::Sha256),
            Some(sha256.hash_bytes())
        );
    }

    #[test]
    fn unpadded_base64_and_options_are_accepted() {
        let value = sri_of("sha256", b"x");
        let unpadded = value.trim_end_matches('=');
        assert_ne!(unpadded, value);
        assert_eq!(
            Sri::parse_list(unpadded).unwrap(),
            Sri::parse_list(&value).unwrap()
        );
        let with_option = format!("{value}?opt");
        assert!(verify(&Sri::parse_list(&with_option).unwrap(), b"x"));
    }

    #[test]
    fn bad_values_are_invalid_argument() {
        let cases = [
            "".to_string(),
            "   ".to_string(),
            "sha1-2jmj7l5rSw0yVb/vlWAYkK/YBwk=".to_string(),
            "sha256-not*base64".to_string(),
            "sha256-AAAA".to_string(),
            format!("{} sha512-AAAA", sri_of("sha256", b"x")),
            "justtext".to_string(),
        ];
        for case in cases {
            let err = Sri::parse_list(&case).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{case:?}");
            assert!(err.to_string().contains("checksum.sri"), "{err}");
        }
    }

    #[test]
    fn errors_echo_at_most_a_bounded_prefix() {
        let long = format!("sha256-{}", "A".repeat(10_000));
        let err = Sri::parse_list(&long).unwrap_err().to_string();
        assert!(err.len() < 400, "{}", err.len());
    }

    #[test]
    fn a_hash_only_for_its_own_function() {
        let list = Sri::parse_list(&sri_of("sha512", b"x")).unwrap();
        assert_eq!(list[0].hash_for(DigestFunction::Sha256), None);
        let sha512 = Digest::of(DigestFunction::Sha512, b"x");
        assert_eq!(
            list[0].hash_for(DigestFunction::Sha512),
            Some(sha512.hash_bytes())
        );
    }

    #[test]
    fn no_expected_value_matches_everything() {
        assert!(verify(&[], b"anything"));
    }
}
