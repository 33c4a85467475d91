//! A trust domain's bundle as validators use it: the X.509 authorities (as parsed
//! trust anchors) and the JWKS document with its sequence number.

use std::time::SystemTime;

use rustls::pki_types::{CertificateDer, TrustAnchor, UnixTime};
use spiffe::TrustDomain;

use crate::x509::{self, LeafInfo, SvidError};

/// Which end of a TLS connection a certificate authenticates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    Server,
    Client,
}

/// One trust domain's bundle. Cheap to share behind an `Arc`; a new sequence
/// means a new value, never a mutation.
#[derive(Clone)]
pub struct TrustBundle {
    trust_domain: TrustDomain,
    sequence: u64,
    authorities: Vec<CertificateDer<'static>>,
    anchors: Vec<TrustAnchor<'static>>,
    jwks: Vec<u8>,
}

impl std::fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustBundle")
            .field("trust_domain", &self.trust_domain.to_string())
            .field("sequence", &self.sequence)
            .field("authorities", &self.authorities.len())
            .finish()
    }
}

impl TrustBundle {
    /// Builds a bundle from DER CA certificates. `jwks` is the SPIFFE bundle
    /// document (may be empty where only X.509 is needed).
    pub fn new(
        trust_domain: TrustDomain,
        sequence: u64,
        authorities: Vec<Vec<u8>>,
        jwks: Vec<u8>,
    ) -> Result<Self, SvidError> {
        let authorities: Vec<CertificateDer<'static>> =
            authorities.into_iter().map(CertificateDer::from).collect();
        let anchors = authorities
            .iter()
            .map(|c| {
                webpki::anchor_from_trusted_cert(c)
                    .map(|a| a.to_owned())
                    .map_err(|e| SvidError::Parse(format!("bundle authority: {e}")))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            trust_domain,
            sequence,
            authorities,
            anchors,
            jwks,
        })
    }

    /// Reads a PEM file of CA certificates (what `control-plane bundle show`
    /// prints and `node-agent run --trust-bundle` takes).
    pub fn from_pem(trust_domain: TrustDomain, pem: &str) -> Result<Self, SvidError> {
        let certs = crate::pem::decode_certs(pem).map_err(SvidError::Parse)?;
        Self::new(trust_domain, 0, certs, Vec::new())
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn sequence(&self) -> u64 {
        self.sequence
    }

    pub fn authorities(&self) -> &[CertificateDer<'static>] {
        &self.authorities
    }

    pub fn jwks(&self) -> &[u8] {
        &self.jwks
    }

    /// The authorities as concatenated DER, the Workload API's bundle encoding.
    pub fn concatenated_der(&self) -> Vec<u8> {
        self.authorities.iter().flat_map(|c| c.iter().copied()).collect()
    }

    pub fn to_pem(&self) -> String {
        crate::pem::encode_certs(self.authorities.iter().map(|c| c.as_ref()))
    }

    /// Validates an X509-SVID chain (leaf first) for `usage` at `now`: the
    /// leaf's trust domain must be this bundle's (X5-17), the path must verify
    /// (X5-15) and the leaf must pass the SVID rules (X5-16).
    pub fn verify(
        &self,
        chain: &[CertificateDer<'_>],
        now: SystemTime,
        usage: Usage,
    ) -> Result<LeafInfo, SvidError> {
        let (leaf, intermediates) = chain.split_first().ok_or(SvidError::EmptyChain)?;
        let info = x509::inspect_leaf(leaf)?;
        let td = info.spiffe_id.trust_domain();
        if td.to_string() != self.trust_domain.to_string() {
            return Err(SvidError::NoBundle(td.to_string()));
        }
        if self.anchors.is_empty() {
            return Err(SvidError::EmptyBundle(td.to_string()));
        }
        let end_entity =
            webpki::EndEntityCert::try_from(leaf).map_err(|e| SvidError::Chain(e.to_string()))?;
        let now = UnixTime::since_unix_epoch(now.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default());
        let eku = match usage {
            Usage::Server => webpki::KeyUsage::server_auth(),
            Usage::Client => webpki::KeyUsage::client_auth(),
        };
        end_entity
            .verify_for_usage(
                webpki::ALL_VERIFICATION_ALGS,
                &self.anchors,
                intermediates,
                now,
                eku,
                None,
                None,
            )
            .map_err(|e| SvidError::Chain(format!("{e:?}")))?;
        Ok(info)
    }
}
