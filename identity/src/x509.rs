//! X509-SVID leaf checks (X5-01..X5-16) on parsed certificates.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use spiffe::SpiffeId;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::spiffe_id::{self, IdError};

/// Why a certificate is not an acceptable X509-SVID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SvidError {
    #[error("certificate is not valid DER: {0}")]
    Parse(String),
    #[error("empty certificate chain")]
    EmptyChain,
    #[error("the leaf has {0} URI SANs; an X509-SVID has exactly one (rules X5-01, X5-02)")]
    UriSanCount(usize),
    #[error("the leaf's URI SAN is not a SPIFFE ID Keyway accepts: {0}")]
    Id(#[from] IdError),
    #[error("the leaf is a CA certificate (basicConstraints cA=true; rule X5-16)")]
    LeafIsCa,
    #[error("the leaf may sign certificates or CRLs (rules X5-12, X5-16)")]
    LeafCanSign,
    #[error("no trust bundle for trust domain {0:?}; SVIDs from it are untrusted (rule X5-17)")]
    NoBundle(String),
    #[error(
        "the trust bundle for {0:?} has no X.509 authorities, so nothing from it is trusted (rule BND-07)"
    )]
    EmptyBundle(String),
    #[error("the chain does not verify against the trust bundle: {0} (rule X5-15)")]
    Chain(String),
    #[error("peer presented {got}, expected {expected}")]
    UnexpectedPeer { got: String, expected: String },
}

/// What a validator learns from a leaf that passed the X5-16 checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafInfo {
    pub spiffe_id: SpiffeId,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub serial: Vec<u8>,
}

fn to_system_time(t: x509_parser::time::ASN1Time) -> SystemTime {
    let secs = t.timestamp();
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
    } else {
        UNIX_EPOCH
    }
}

/// Parses one DER certificate, refusing trailing bytes.
pub fn parse(der: &[u8]) -> Result<X509Certificate<'_>, SvidError> {
    let (rest, cert) = X509Certificate::from_der(der).map_err(|e| SvidError::Parse(e.to_string()))?;
    if !rest.is_empty() {
        return Err(SvidError::Parse("trailing bytes after the certificate".into()));
    }
    Ok(cert)
}

/// The URI SANs of a certificate, in order.
pub fn uri_sans<'a>(cert: &'a X509Certificate<'_>) -> Vec<&'a str> {
    cert.extensions()
        .iter()
        .filter_map(|ext| match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => Some(san),
            _ => None,
        })
        .flat_map(|san| san.general_names.iter())
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect()
}

/// Applies the validator's leaf rules (X5-16): exactly one URI SAN holding a
/// SPIFFE ID with a path, not a CA, no keyCertSign/cRLSign.
pub fn inspect_leaf(der: &[u8]) -> Result<LeafInfo, SvidError> {
    let cert = parse(der)?;
    let uris = uri_sans(&cert);
    if uris.len() != 1 {
        return Err(SvidError::UriSanCount(uris.len()));
    }
    let spiffe_id = spiffe_id::parse_svid_id(uris[0])?;
    if let Ok(Some(bc)) = cert.basic_constraints()
        && bc.value.ca
    {
        return Err(SvidError::LeafIsCa);
    }
    if let Ok(Some(ku)) = cert.key_usage()
        && (ku.value.key_cert_sign() || ku.value.crl_sign())
    {
        return Err(SvidError::LeafCanSign);
    }
    Ok(LeafInfo {
        spiffe_id,
        not_before: to_system_time(cert.validity().not_before),
        not_after: to_system_time(cert.validity().not_after),
        serial: cert.raw_serial().to_vec(),
    })
}

/// NotAfter of any certificate (used for CA certificates too).
pub fn not_after(der: &[u8]) -> Result<SystemTime, SvidError> {
    Ok(to_system_time(parse(der)?.validity().not_after))
}

/// NotBefore of any certificate.
pub fn not_before(der: &[u8]) -> Result<SystemTime, SvidError> {
    Ok(to_system_time(parse(der)?.validity().not_before))
}

/// Splits concatenated DER certificates (the Workload API's chain and bundle
/// encoding, WL-09) into single certificates.
pub fn split_der(concatenated: &[u8]) -> Result<Vec<Vec<u8>>, SvidError> {
    let mut rest = concatenated;
    let mut out = Vec::new();
    while !rest.is_empty() {
        let (next, _) = X509Certificate::from_der(rest).map_err(|e| SvidError::Parse(e.to_string()))?;
        out.push(rest[..rest.len() - next.len()].to_vec());
        rest = next;
    }
    Ok(out)
}
