//! rustls configuration that authenticates peers by SPIFFE ID.
//!
//! Standard WebPKI verification checks DNS names; SVIDs carry a URI SAN instead.
//! These verifiers check the chain against the *current* trust bundle (read from
//! a `watch` channel, so CA rotation takes effect on the next handshake without
//! rebuilding configs), apply the X5-16 leaf rules, and then match the peer's
//! SPIFFE ID. Only TLS 1.3 is offered.

use std::sync::Arc;
use std::time::SystemTime;

use rustls::client::ResolvesClientCert;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use spiffe::SpiffeId;
use tokio::sync::watch;

use crate::bundle::{TrustBundle, Usage};
use crate::x509::{LeafInfo, SvidError};

/// The bundle a verifier reads on every handshake.
pub type BundleWatch = watch::Receiver<Arc<TrustBundle>>;
/// The SVID a resolver presents on every handshake (`None` until one exists).
pub type CertWatch = watch::Receiver<Option<Arc<CertifiedKey>>>;

/// Which peers a verifier accepts once the chain is valid.
#[derive(Debug, Clone)]
pub enum PeerMatch {
    /// Exactly this SPIFFE ID.
    Exact(SpiffeId),
    /// Any SVID of the bundle's trust domain; the caller authorizes later.
    AnyInTrustDomain,
}

impl PeerMatch {
    fn check(&self, info: &LeafInfo) -> Result<(), SvidError> {
        match self {
            PeerMatch::Exact(want) if *want != info.spiffe_id => Err(SvidError::UnexpectedPeer {
                got: info.spiffe_id.to_string(),
                expected: want.to_string(),
            }),
            _ => Ok(()),
        }
    }
}

/// The crypto provider Keyway uses everywhere (ring, per DESIGN.md).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn to_system_time(now: UnixTime) -> SystemTime {
    SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(now.as_secs())
}

fn reject(e: SvidError) -> rustls::Error {
    rustls::Error::General(e.to_string())
}

/// Checks a presented chain against the live bundle and the peer rule.
fn verify_peer(
    bundle: &BundleWatch,
    peer: &PeerMatch,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: Usage,
) -> Result<(), rustls::Error> {
    let chain: Vec<CertificateDer<'_>> = std::iter::once(end_entity.clone())
        .chain(intermediates.iter().cloned())
        .collect();
    let bundle = bundle.borrow().clone();
    let info = bundle
        .verify(&chain, to_system_time(now), usage)
        .map_err(reject)?;
    peer.check(&info).map_err(reject)
}

/// Keyway speaks TLS 1.3 only; a TLS 1.2 signature is never acceptable.
fn tls12_refused() -> Result<HandshakeSignatureValid, rustls::Error> {
    Err(rustls::Error::PeerIncompatible(
        rustls::PeerIncompatible::Tls13RequiredForQuic,
    ))
}

/// Verifies the server's SVID (used by clients).
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    bundle: BundleWatch,
    peer: PeerMatch,
    algs: WebPkiSupportedAlgorithms,
}

impl SpiffeServerVerifier {
    pub fn new(bundle: BundleWatch, peer: PeerMatch) -> Self {
        Self {
            bundle,
            peer,
            algs: provider().signature_verification_algorithms,
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        verify_peer(
            &self.bundle,
            &self.peer,
            end_entity,
            intermediates,
            now,
            Usage::Server,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Verifies a client's SVID (used by servers).
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    bundle: BundleWatch,
    peer: PeerMatch,
    mandatory: bool,
    algs: WebPkiSupportedAlgorithms,
}

impl SpiffeClientVerifier {
    /// `mandatory = false` lets clients without a certificate finish the
    /// handshake (the control plane's Attest call); the service then decides
    /// per call.
    pub fn new(bundle: BundleWatch, peer: PeerMatch, mandatory: bool) -> Self {
        Self {
            bundle,
            peer,
            mandatory,
            algs: provider().signature_verification_algorithms,
        }
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        verify_peer(
            &self.bundle,
            &self.peer,
            end_entity,
            intermediates,
            now,
            Usage::Client,
        )?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Presents whatever SVID the watch currently holds.
#[derive(Debug)]
pub struct SvidResolver(pub CertWatch);

impl ResolvesServerCert for SvidResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.borrow().clone()
    }
}

impl ResolvesClientCert for SvidResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.0.borrow().clone()
    }

    fn has_certs(&self) -> bool {
        self.0.borrow().is_some()
    }
}

/// A TLS 1.3 server config presenting `cert` and verifying clients with
/// `client_verifier`. ALPN is `h2` (gRPC).
pub fn server_config(
    cert: CertWatch,
    client_verifier: Arc<dyn ClientCertVerifier>,
) -> Result<rustls::ServerConfig, rustls::Error> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(client_verifier)
        .with_cert_resolver(Arc::new(SvidResolver(cert)));
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// A TLS 1.3 client config verifying the server with `bundle`/`peer` and
/// presenting `cert` when it holds one.
pub fn client_config(
    bundle: BundleWatch,
    peer: PeerMatch,
    cert: Option<CertWatch>,
) -> Result<rustls::ClientConfig, rustls::Error> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(bundle, peer)));
    let mut config = match cert {
        Some(cert) => builder.with_client_cert_resolver(Arc::new(SvidResolver(cert))),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// The verified leaf of the peer of an established connection (its SPIFFE
/// ID, serial and validity), parsed once.
pub fn peer_leaf(certs: Option<&[CertificateDer<'_>]>) -> Option<crate::x509::LeafInfo> {
    crate::x509::inspect_leaf(certs?.first()?).ok()
}
