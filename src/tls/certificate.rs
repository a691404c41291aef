//! What a verified client certificate says about its holder: the DER the
//! TLS handshake checked, read with `x509-cert` (RustCrypto) into a [`ClientCertificate`]
//! (common name, subjectAltName DNS names, e-mail addresses and URIs, and the
//! SHA-256 of the DER) that authentication maps to a credential name.

use sha2::{Digest, Sha256};
use x509_cert::Certificate;
use x509_cert::der::asn1::{Ia5StringRef, PrintableStringRef, Utf8StringRef};
use x509_cert::der::oid::db::rfc4519::COMMON_NAME;
use x509_cert::der::{Decode, Tag, Tagged};
use x509_cert::ext::pkix::SubjectAltName;
use x509_cert::ext::pkix::name::GeneralName;

use crate::peer::ClientCertificate;

/// Reads the names out of `der`, a certificate rustls has already verified
/// against `client_ca`. A certificate that cannot be read still yields its
/// SHA-256 (and no names), so it maps to no credential rather than failing
/// the connection.
pub fn client_certificate(der: &[u8]) -> ClientCertificate {
    let sha256 = hex::encode(Sha256::digest(der));
    let cert = match Certificate::from_der(der) {
        Ok(cert) => cert,
        Err(e) => {
            tracing::debug!("cannot read the names of client certificate {sha256}: {e}");
            return ClientCertificate {
                sha256,
                ..ClientCertificate::default()
            };
        }
    };
    let tbs = &cert.tbs_certificate;
    let common_name = tbs
        .subject
        .0
        .iter()
        .flat_map(|rdn| rdn.0.iter())
        .filter(|attr| attr.oid == COMMON_NAME)
        .find_map(|attr| directory_string(&attr.value));
    let subject_alt_names = match tbs.get::<SubjectAltName>() {
        Ok(Some((_, san))) => san
            .0
            .iter()
            .filter_map(|name| match name {
                GeneralName::DnsName(s)
                | GeneralName::Rfc822Name(s)
                | GeneralName::UniformResourceIdentifier(s) => Some(s.to_string()),
                _ => None,
            })
            .collect(),
        Ok(None) => Vec::new(),
        Err(e) => {
            tracing::debug!("client certificate {sha256}: unreadable subjectAltName: {e}");
            Vec::new()
        }
    };
    ClientCertificate {
        common_name,
        subject_alt_names,
        sha256,
    }
}

/// The text of a name attribute in the string types certificates use for
/// a common name; None for other types.
fn directory_string(value: &x509_cert::attr::AttributeValue) -> Option<String> {
    let text = match value.tag() {
        Tag::Utf8String => Utf8StringRef::try_from(value).ok()?.as_str().to_string(),
        Tag::PrintableString => PrintableStringRef::try_from(value)
            .ok()?
            .as_str()
            .to_string(),
        Tag::Ia5String => Ia5StringRef::try_from(value).ok()?.as_str().to_string(),
        _ => return None,
    };
    Some(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DnType, KeyPair, SanType};

    fn der(params: CertificateParams) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn names_and_fingerprint_come_from_the_der() {
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "ci-runner-7");
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Office");
        params.subject_alt_names = vec![
            SanType::DnsName("runner7.office.example".try_into().unwrap()),
            SanType::Rfc822Name("ci@office.example".try_into().unwrap()),
            SanType::URI("spiffe://office/ci".try_into().unwrap()),
            SanType::IpAddress("10.0.0.7".parse().unwrap()),
        ];
        let der = der(params);
        let cert = client_certificate(&der);
        assert_eq!(cert.common_name.as_deref(), Some("ci-runner-7"));
        // IP addresses are not names a rule can match; the rest keep their order.
        assert_eq!(
            cert.subject_alt_names,
            vec![
                "runner7.office.example",
                "ci@office.example",
                "spiffe://office/ci"
            ]
        );
        assert_eq!(cert.sha256, hex::encode(Sha256::digest(&der)));
        assert_eq!(cert.sha256.len(), 64);
    }

    #[test]
    fn a_certificate_without_names_has_none() {
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        let cert = client_certificate(&der(params));
        assert_eq!(cert.common_name, None);
        assert!(cert.subject_alt_names.is_empty());
    }

    #[test]
    fn unreadable_der_keeps_only_the_fingerprint() {
        let cert = client_certificate(b"not a certificate");
        assert_eq!(
            cert,
            ClientCertificate {
                common_name: None,
                subject_alt_names: Vec::new(),
                sha256: hex::encode(Sha256::digest(b"not a certificate")),
            }
        );
    }
}
