//! CSR checks on the CA side. A CSR only contributes its public key: the
//! SPIFFE ID always comes from the control plane's own records.

use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509CertificationRequest};

/// Largest CSR accepted, in bytes. A P-256 CSR is about 250 bytes.
pub const MAX_CSR_BYTES: usize = 8 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    #[error("the CSR is empty")]
    Empty,
    #[error("the CSR is {0} bytes; at most {MAX_CSR_BYTES} are accepted")]
    TooLarge(usize),
    #[error("the CSR is not valid DER PKCS#10: {0}")]
    Malformed(String),
    #[error("the CSR's signature does not verify: it must be signed by the key it carries")]
    BadSignature,
    #[error("the CSR's key is {0}; Keyway issues SVIDs for ECDSA P-256 keys only")]
    UnsupportedKey(String),
    #[error("the CSR asks for a CA certificate (basicConstraints cA=true); SVIDs are never CAs (rule X5-08)")]
    AsksForCa,
    #[error("the CSR asks for {0} URI SANs; an X509-SVID carries exactly one, set by the CA (rule X5-01)")]
    ExtraUriSans(usize),
    #[error(
        "the CSR asks for URI SAN {asked:?} but the identity is {expected:?}; the CA takes the SPIFFE ID from its records"
    )]
    WrongUriSan { asked: String, expected: String },
}

/// Validates a CSR for `expected_id` and returns its public key.
pub fn check(der: &[u8], expected_id: &str) -> Result<rcgen::SubjectPublicKeyInfo, CsrError> {
    if der.is_empty() {
        return Err(CsrError::Empty);
    }
    if der.len() > MAX_CSR_BYTES {
        return Err(CsrError::TooLarge(der.len()));
    }
    let (rest, csr) =
        X509CertificationRequest::from_der(der).map_err(|e| CsrError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CsrError::Malformed("trailing bytes after the CSR".into()));
    }
    let spki = &csr.certification_request_info.subject_pki;
    let alg = spki.algorithm.algorithm.to_id_string();
    let params = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok())
        .map(|o| o.to_id_string());
    const EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
    const P256: &str = "1.2.840.10045.3.1.7";
    if alg != EC_PUBLIC_KEY || params.as_deref() != Some(P256) {
        return Err(CsrError::UnsupportedKey(match params {
            Some(p) => format!("{alg} with parameters {p}"),
            None => alg,
        }));
    }
    csr.verify_signature().map_err(|_| CsrError::BadSignature)?;
    if let Some(exts) = csr.requested_extensions() {
        for ext in exts {
            match ext {
                ParsedExtension::BasicConstraints(bc) if bc.ca => return Err(CsrError::AsksForCa),
                ParsedExtension::SubjectAlternativeName(san) => {
                    let uris: Vec<&str> = san
                        .general_names
                        .iter()
                        .filter_map(|n| match n {
                            GeneralName::URI(u) => Some(*u),
                            _ => None,
                        })
                        .collect();
                    if uris.len() > 1 {
                        return Err(CsrError::ExtraUriSans(uris.len()));
                    }
                    if let Some(u) = uris.first()
                        && *u != expected_id
                    {
                        return Err(CsrError::WrongUriSan {
                            asked: (*u).to_owned(),
                            expected: expected_id.to_owned(),
                        });
                    }
                }
                _ => {}
            }
        }
    }
    rcgen::SubjectPublicKeyInfo::from_der(spki.raw).map_err(|e| CsrError::UnsupportedKey(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "spiffe://td/ns/a/sa/b";

    fn csr_with(f: impl FnOnce(&mut rcgen::CertificateParams)) -> Vec<u8> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::default();
        f(&mut params);
        params.serialize_request(&key).unwrap().der().to_vec()
    }

    #[test]
    fn plain_csr_is_accepted() {
        let (_, der) = keyway_identity::csr::generate().unwrap();
        assert!(check(&der, ID).is_ok());
    }

    #[test]
    fn ca_request_is_refused() {
        let der = csr_with(|p| p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained));
        assert_eq!(check(&der, ID).unwrap_err(), CsrError::AsksForCa);
    }

    #[test]
    fn extra_or_foreign_uri_sans_are_refused() {
        let der = csr_with(|p| {
            p.subject_alt_names = vec![
                rcgen::SanType::URI(ID.try_into().unwrap()),
                rcgen::SanType::URI("spiffe://td/ns/x/sa/y".try_into().unwrap()),
            ]
        });
        assert_eq!(check(&der, ID).unwrap_err(), CsrError::ExtraUriSans(2));
        let der = csr_with(|p| {
            p.subject_alt_names = vec![rcgen::SanType::URI("spiffe://td/ns/x/sa/y".try_into().unwrap())]
        });
        assert!(matches!(
            check(&der, ID).unwrap_err(),
            CsrError::WrongUriSan { .. }
        ));
    }

    #[test]
    fn tampered_signature_is_refused() {
        let (_, mut der) = keyway_identity::csr::generate().unwrap();
        let last = der.len() - 3;
        der[last] ^= 0x55;
        assert_eq!(check(&der, ID).unwrap_err(), CsrError::BadSignature);
    }

    #[test]
    fn garbage_and_oversize_are_refused() {
        assert!(matches!(
            check(b"not a csr", ID).unwrap_err(),
            CsrError::Malformed(_)
        ));
        assert_eq!(check(&[], ID).unwrap_err(), CsrError::Empty);
        assert!(matches!(
            check(&vec![0u8; MAX_CSR_BYTES + 1], ID).unwrap_err(),
            CsrError::TooLarge(_)
        ));
    }

    #[test]
    fn non_p256_keys_are_refused() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let der = rcgen::CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .der()
            .to_vec();
        assert!(matches!(
            check(&der, ID).unwrap_err(),
            CsrError::UnsupportedKey(_)
        ));
    }
}
