//! What a verified client certificate says about its holder: the DER the
//! TLS handshake checked, read with `x509-parser` into a [`ClientCertificate`]
//! (common name, subjectAltName DNS names, e-mail addresses and URIs, and the
//! SHA-256 of the DER) that authentication maps to a credential name.

use sha2::{Digest, Sha256};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::peer::ClientCertificate;

/// Reads the names out of `der`, a certificate rustls has already verified
/// against `client_ca`. A certificate x509-parser cannot read still yields
/// its SHA-256 (and no names), so it maps to no credential rather than
/// failing the connection.
pub fn client_certificate(der: &[u8]) -> ClientCertificate {
    let sha256 = hex::encode(Sha256::digest(der));
    let cert = match X509Certificate::from_der(der) {
        Ok((_, cert)) => cert,
        Err(e) => {
            tracing::debug!("cannot read the names of client certificate {sha256}: {e}");
            return ClientCertificate {
                sha256,
                ..ClientCertificate::default()
            };
        }
    };
    let common_name = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string);
    let subject_alt_names = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|name| match name {
                GeneralName::DNSName(s) | GeneralName::RFC822Name(s) | GeneralName::URI(s) => {
                    Some(s.to_string())
                }
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
