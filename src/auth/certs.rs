//! Mutual TLS: which `[[auth.client_certificates]]` rule a verified client
//! certificate matches, and so which credential it is. The TLS handshake has
//! already checked the certificate against `[server] client_ca`; this only
//! names it.

use std::sync::Arc;

use crate::config::ClientCertRule;
use crate::peer::ClientCertificate;

use super::role::Principal;

/// The credential of the first rule `certificate` matches (rules are tried
/// in file order): its common name equals the rule's `common_name`, or one
/// of its subjectAltNames equals the rule's `subject_alt_name` (exactly,
/// case-sensitive).
pub fn principal_for(
    rules: &[ClientCertRule],
    certificate: &ClientCertificate,
) -> Option<Principal> {
    let rule = rules.iter().find(|rule| {
        let by_cn = rule
            .common_name
            .as_ref()
            .is_some_and(|cn| certificate.common_name.as_ref() == Some(cn));
        let by_san = rule
            .subject_alt_name
            .as_ref()
            .is_some_and(|san| certificate.subject_alt_names.contains(san));
        by_cn || by_san
    })?;
    Some(Principal {
        name: Arc::from(rule.name.as_str()),
        role: rule.role,
        write_ac: rule.write_ac,
    })
}

/// How a certificate is named in messages and logs: its CN, else its first
/// SAN, and the start of its SHA-256 (never secret).
pub fn describe(certificate: &ClientCertificate) -> String {
    let subject = certificate
        .common_name
        .as_ref()
        .map(|cn| format!("CN={cn}"))
        .or_else(|| {
            certificate
                .subject_alt_names
                .first()
                .map(|s| format!("SAN={s}"))
        })
        .unwrap_or_else(|| "no subject".to_string());
    let short = certificate.sha256.get(..16).unwrap_or(&certificate.sha256);
    format!("{subject}, sha256 {short}…")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Role;

    fn rule(name: &str, cn: Option<&str>, san: Option<&str>, role: Role) -> ClientCertRule {
        ClientCertRule {
            name: name.into(),
            common_name: cn.map(Into::into),
            subject_alt_name: san.map(Into::into),
            role,
            write_ac: name == "ci",
        }
    }

    fn cert(cn: Option<&str>, sans: &[&str]) -> ClientCertificate {
        ClientCertificate {
            common_name: cn.map(Into::into),
            subject_alt_names: sans.iter().map(|s| s.to_string()).collect(),
            sha256: "0123456789abcdef0123".into(),
        }
    }

    #[test]
    fn a_certificate_is_named_by_the_first_rule_its_cn_or_san_matches() {
        let rules = [
            rule("ci", Some("ci-runner"), None, Role::Execute),
            rule("alice", None, Some("alice@example.com"), Role::Write),
            rule(
                "builders",
                None,
                Some("spiffe://office/builder"),
                Role::Read,
            ),
        ];
        let ci = principal_for(&rules, &cert(Some("ci-runner"), &[])).unwrap();
        assert_eq!(
            (&*ci.name, ci.role, ci.write_ac),
            ("ci", Role::Execute, true)
        );
        let alice = principal_for(
            &rules,
            &cert(Some("Alice"), &["alice.example.com", "alice@example.com"]),
        )
        .unwrap();
        assert_eq!((&*alice.name, alice.role), ("alice", Role::Write));
        let builder = principal_for(&rules, &cert(None, &["spiffe://office/builder"])).unwrap();
        assert_eq!(&*builder.name, "builders");
        // The first matching rule wins.
        let both = principal_for(&rules, &cert(Some("ci-runner"), &["alice@example.com"]));
        assert_eq!(&*both.unwrap().name, "ci");
        // Exact matches only: no case folding, no CN-as-SAN, no substring.
        assert!(principal_for(&rules, &cert(Some("CI-RUNNER"), &[])).is_none());
        assert!(principal_for(&rules, &cert(None, &["ci-runner"])).is_none());
        assert!(principal_for(&rules, &cert(Some("alice@example.com"), &[])).is_none());
        assert!(principal_for(&rules, &cert(None, &["x.alice@example.com"])).is_none());
        assert!(principal_for(&[], &cert(Some("ci-runner"), &[])).is_none());
        assert_eq!(
            describe(&cert(Some("ci-runner"), &[])),
            "CN=ci-runner, sha256 0123456789abcdef…"
        );
    }
}
