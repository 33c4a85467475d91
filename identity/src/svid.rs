//! An X509-SVID with its private key, as its holder keeps it.

use std::sync::Arc;
use std::time::SystemTime;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use spiffe::SpiffeId;

use crate::x509::{self, SvidError};

/// An SVID and its key. `Debug` never shows the key.
#[derive(Clone)]
pub struct Svid {
    spiffe_id: SpiffeId,
    // Shared: the SVID set is cloned on every rotation, the certificates need not be.
    chain: Arc<[CertificateDer<'static>]>,
    // Zeroed when the last holder lets go (an identity leaving the node).
    key_pkcs8: Arc<zeroize::Zeroizing<Vec<u8>>>,
    not_before: SystemTime,
    not_after: SystemTime,
    serial: Vec<u8>,
}

impl std::fmt::Debug for Svid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Svid")
            .field("spiffe_id", &self.spiffe_id.to_string())
            .field("not_after", &self.not_after)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl Svid {
    /// Pairs a DER chain (leaf first) with its PKCS#8 key, checking the leaf
    /// is an SVID and that the key belongs to it.
    pub fn new(chain: Vec<Vec<u8>>, key_pkcs8: Vec<u8>) -> Result<Self, SvidError> {
        let leaf = chain.first().ok_or(SvidError::EmptyChain)?;
        let info = x509::inspect_leaf(leaf)?;
        let key = rcgen::KeyPair::try_from(key_pkcs8.as_slice())
            .map_err(|e| SvidError::Parse(format!("private key: {e}")))?;
        let cert = x509::parse(leaf)?;
        if cert.public_key().subject_public_key.data.as_ref() != rcgen::PublicKeyData::der_bytes(&key) {
            return Err(SvidError::Parse(
                "the private key does not belong to the leaf certificate".into(),
            ));
        }
        Ok(Self {
            spiffe_id: info.spiffe_id,
            chain: chain
                .into_iter()
                .map(CertificateDer::from)
                .collect::<Vec<_>>()
                .into(),
            key_pkcs8: Arc::new(zeroize::Zeroizing::new(key_pkcs8)),
            not_before: info.not_before,
            not_after: info.not_after,
            serial: info.serial,
        })
    }

    pub fn spiffe_id(&self) -> &SpiffeId {
        &self.spiffe_id
    }

    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    pub fn serial(&self) -> &[u8] {
        &self.serial
    }

    /// The unencrypted PKCS#8 key. Callers must not log it.
    pub fn key_pkcs8(&self) -> &[u8] {
        &self.key_pkcs8
    }

    /// The chain as concatenated DER, the Workload API's encoding.
    pub fn chain_der(&self) -> Vec<u8> {
        self.chain.iter().flat_map(|c| c.iter().copied()).collect()
    }

    pub fn chain_pem(&self) -> String {
        crate::pem::encode_certs(self.chain.iter().map(|c| c.as_ref()))
    }

    pub fn key_pem(&self) -> String {
        crate::pem::encode_pkcs8_key(&self.key_pkcs8)
    }

    /// The SVID as rustls presents it.
    pub fn certified_key(&self) -> Result<Arc<CertifiedKey>, rustls::Error> {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_pkcs8.to_vec()));
        let signing = rustls::crypto::ring::sign::any_ecdsa_type(&key)?;
        Ok(Arc::new(CertifiedKey::new(self.chain.to_vec(), signing)))
    }
}
