//! Key generation and CSRs: how a caller asks for an SVID without its private
//! key ever leaving the process that made it.

/// A fresh ECDSA P-256 key and a DER CSR for it. The CSR carries no subject and
/// no SANs: the CA takes the SPIFFE ID from its own records, never from the CSR.
pub fn generate() -> Result<(rcgen::KeyPair, Vec<u8>), rcgen::Error> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let csr = csr_for(&key)?;
    Ok((key, csr))
}

/// A DER CSR for an existing key.
pub fn csr_for(key: &rcgen::KeyPair) -> Result<Vec<u8>, rcgen::Error> {
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    Ok(params.serialize_request(key)?.der().to_vec())
}
