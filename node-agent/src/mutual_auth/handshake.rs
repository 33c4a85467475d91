//! The agent-to-agent handshake (DESIGN.md section 5) on the auth port.
//!
//! For a pair (local identity L, remote identity R, remote node N), the agent
//! of this node dials N's agent: TLS 1.3, presenting L's SVID, naming R in the
//! SNI (`id-<R>.keyway-auth`, since SPIFFE IDs are not DNS names). N's agent
//! answers with R's SVID only if R has a workload there; each side verifies
//! the other's chain against the trust bundle and requires exactly one URI
//! SAN equal to the expected SPIFFE ID. Then one JSON line each way: the
//! dialer says which pair and which node it speaks for; the server checks
//! that the certificate it saw is L's and that the connection comes from
//! that node's address, records its own entry (R, L, dialer's node) when its
//! policy wants one, and says ok. Both sides' entries expire at the earlier
//! NotAfter of the two leaves. No session resumption: every handshake
//! verifies both certificates.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use keyway_common::AuthKey;
use keyway_identity::lock::RecoverRw;
use keyway_identity::tls::{BundleWatch, PeerMatch, SpiffeClientVerifier, SpiffeServerVerifier, provider};
use keyway_identity::{SpiffeId, Svid, x509};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::{TlsAcceptor, TlsConnector};

pub const ALPN: &[u8] = b"keyway-auth/1";
/// Longest a whole handshake (connect, TLS, one exchange) may take.
pub const TIMEOUT: Duration = Duration::from_secs(5);
/// Largest JSON line either side reads.
const MAX_LINE: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS with {addr}: {source}")]
    Tls {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the peer refused: {0}")]
    Refused(String),
    #[error("protocol: {0}")]
    Protocol(String),
    /// A leaf whose validity could not be read (a protocol failure too).
    #[error("protocol: {0}")]
    Certificate(#[from] x509::SvidError),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Local(String),
}

impl HandshakeError {
    /// The `result` label of `keyway_handshakes_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            HandshakeError::Connect { .. } => "connect",
            HandshakeError::Tls { .. } => "tls",
            HandshakeError::Refused(_) => "refused",
            HandshakeError::Protocol(_) | HandshakeError::Certificate(_) => "protocol",
            HandshakeError::Timeout(_) => "timeout",
            HandshakeError::Local(_) => "local",
        }
    }
}

/// What the dialer asks for after the TLS handshake.
#[derive(Debug, Serialize, Deserialize)]
struct Hello {
    /// The dialer's local identity (L); its SVID is the client certificate.
    local: u32,
    /// The identity the dialer wants (R); its SVID is the server certificate.
    remote: u32,
    /// The node the dialer speaks for.
    node: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Answer {
    ok: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    error: String,
}

/// The SNI that names identity `id`.
pub fn sni_for(id: u32) -> String {
    format!("id-{id}.keyway-auth")
}

fn id_from_sni(sni: &str) -> Option<u32> {
    sni.strip_prefix("id-")?
        .strip_suffix(".keyway-auth")?
        .parse()
        .ok()
}

/// The earlier NotAfter of two leaves.
pub fn earlier_not_after(
    a: &CertificateDer<'_>,
    b: &CertificateDer<'_>,
) -> Result<SystemTime, x509::SvidError> {
    let a = x509::inspect_leaf(a)?;
    let b = x509::inspect_leaf(b)?;
    Ok(a.not_after.min(b.not_after))
}

/// A wall-clock instant as kernel monotonic nanoseconds (what the auth map
/// stores, see [`crate::datapath::monotonic_ns`]).
pub fn to_monotonic_ns(at: SystemTime) -> u64 {
    let now_mono = crate::datapath::monotonic_ns();
    match at.duration_since(SystemTime::now()) {
        Ok(left) => now_mono.saturating_add(left.as_nanos() as u64),
        Err(_) => now_mono,
    }
}

/// SVIDs this node can present, by numeric identity (one owner: the auth
/// manager replaces the whole table when SVIDs or workloads change).
#[derive(Debug, Default)]
pub struct LocalCerts {
    by_identity: RwLock<HashMap<u32, Arc<CertifiedKey>>>,
}

impl LocalCerts {
    pub fn replace(&self, table: HashMap<u32, Arc<CertifiedKey>>) {
        *self.by_identity.write_locked() = table;
    }

    pub fn get(&self, id: u32) -> Option<Arc<CertifiedKey>> {
        self.by_identity.read_locked().get(&id).cloned()
    }
}

#[derive(Debug)]
struct BySni(Arc<LocalCerts>);

impl ResolvesServerCert for BySni {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // No certificate (the handshake fails) unless the named identity has
        // a workload, and so an SVID, on this node.
        self.0.get(id_from_sni(hello.server_name()?)?)
    }
}

/// Everything the server side consults, refreshed by the auth manager.
#[derive(Debug, Clone)]
pub struct PeerDirectory {
    /// SPIFFE ID of each numeric identity (the cluster-wide identity table).
    pub spiffe_ids: HashMap<u32, String>,
    /// Node name -> (node id, addresses' IPs).
    pub nodes: HashMap<String, (u16, Vec<std::net::IpAddr>)>,
}

/// A verified request from a peer agent: the server side's own entry to
/// record (R, L, dialer's node), with its expiry.
#[derive(Debug, Clone, Copy)]
pub struct Accepted {
    pub key: AuthKey,
    pub expiry: SystemTime,
}

/// Serves the auth port until shutdown. Verified requests go to `accepted`
/// (the auth manager decides whether its own policy wants the entry).
pub async fn serve(
    listener: TcpListener,
    bundle: BundleWatch,
    certs: Arc<LocalCerts>,
    directory: watch::Receiver<Arc<PeerDirectory>>,
    accepted: mpsc::Sender<Accepted>,
    shutdown: watch::Receiver<bool>,
) {
    let metrics = super::AuthMetrics::default();
    serve_with_metrics(listener, bundle, certs, directory, accepted, metrics, shutdown).await
}

/// What the auth port allows. A handshake is one short connection (the
/// whole exchange is bounded by its timeout); a peer node pre-authenticating
/// many pairs at once opens several, so the per-address cap is generous,
/// and the total keeps a flood from exhausting the agent.
pub fn limits() -> keyway_serve::Limits {
    keyway_serve::Limits {
        max_connections: 1024,
        max_per_peer: 64,
        request_header_timeout: TIMEOUT,
        ..keyway_serve::Limits::default()
    }
}

/// Like [`serve`], counting answered handshakes in `metrics`.
pub async fn serve_with_metrics(
    listener: TcpListener,
    bundle: BundleWatch,
    certs: Arc<LocalCerts>,
    directory: watch::Receiver<Arc<PeerDirectory>>,
    accepted: mpsc::Sender<Accepted>,
    metrics: super::AuthMetrics,
    mut shutdown: watch::Receiver<bool>,
) {
    use super::HandshakeRole;
    let mut config = match rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
    {
        Ok(b) => b
            .with_client_cert_verifier(Arc::new(SpiffeClientVerifier::new(
                bundle,
                PeerMatch::AnyInTrustDomain,
                true,
            )))
            .with_cert_resolver(Arc::new(BySni(certs.clone()))),
        Err(e) => {
            tracing::error!(error = %e, "cannot build the auth server's TLS config");
            return;
        }
    };
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let gate = keyway_serve::Gate::new("auth", limits(), metrics.listeners.clone());
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    gate.accept_failed(&e);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        // A dual-stack listener sees IPv4 peers as ::ffff:a.b.c.d; node
        // addresses name them as IPv4.
        let peer = std::net::SocketAddr::new(peer.ip().to_canonical(), peer.port());
        let Ok(permit) = gate.admit(keyway_serve::PeerKey::ip(peer.ip())) else {
            continue;
        };
        let acceptor = acceptor.clone();
        let certs = certs.clone();
        let directory = directory.borrow().clone();
        let accepted = accepted.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let started = std::time::Instant::now();
            let e = match tokio::time::timeout(TIMEOUT, answer(acceptor, &certs, tcp, peer, &directory)).await
            {
                Ok(Ok(a)) => {
                    metrics.handshake(HandshakeRole::Answer, Ok(()), started);
                    let _ = accepted.send(a).await;
                    return;
                }
                Ok(Err(e)) => e,
                Err(_) => HandshakeError::Timeout(TIMEOUT),
            };
            metrics.handshake(HandshakeRole::Answer, Err(e.kind()), started);
            // Once per peer address and reason a minute: a peer retrying
            // with backoff does not fill the log.
            if metrics
                .handshake_log
                .should_warn(&format!("answer/{}/{}", peer.ip(), e.kind()))
            {
                tracing::info!(peer = %peer, error = %e, "refused a mutual-auth handshake");
            } else {
                tracing::debug!(peer = %peer, error = %e, "refused a mutual-auth handshake (again)");
            }
        });
    }
}

async fn answer(
    acceptor: TlsAcceptor,
    certs: &LocalCerts,
    tcp: TcpStream,
    peer: SocketAddr,
    directory: &PeerDirectory,
) -> Result<Accepted, HandshakeError> {
    let _ = tcp.set_nodelay(true);
    let tls = acceptor
        .accept(tcp)
        .await
        .map_err(|source| HandshakeError::Tls { addr: peer, source })?;
    let conn = tls.get_ref().1;
    let client_leaf = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .cloned()
        .ok_or_else(|| HandshakeError::Protocol("no client certificate".into()))?;
    let server_identity = conn
        .server_name()
        .and_then(id_from_sni)
        .ok_or_else(|| HandshakeError::Protocol("no identity named in the SNI".into()))?;
    // The leaf this side presented (the resolver found it, so it exists
    // unless the SVID rotated in between; then the new one bounds it).
    let own_leaf = certs
        .get(server_identity)
        .and_then(|ck| ck.cert.first().cloned())
        .ok_or_else(|| HandshakeError::Local(format!("no SVID for identity {server_identity} any more")))?;
    let (read, mut write) = tokio::io::split(tls);
    let mut line = String::new();
    BufReader::new(read.take_limited())
        .read_line(&mut line)
        .await
        .map_err(|e| HandshakeError::Protocol(e.to_string()))?;
    let verdict = check_hello(&line, &client_leaf, server_identity, peer, directory).and_then(|key| {
        let expiry = earlier_not_after(&client_leaf, &own_leaf)?;
        Ok(Accepted { key, expiry })
    });
    let reply = match &verdict {
        Ok(_) => Answer {
            ok: true,
            error: String::new(),
        },
        Err(e) => Answer {
            ok: false,
            error: e.to_string(),
        },
    };
    let mut out = serde_json::to_vec(&reply).map_err(|e| HandshakeError::Protocol(e.to_string()))?;
    out.push(b'\n');
    write
        .write_all(&out)
        .await
        .map_err(|e| HandshakeError::Protocol(e.to_string()))?;
    let _ = write.shutdown().await;
    verdict
}

fn check_hello(
    line: &str,
    client_leaf: &CertificateDer<'_>,
    server_identity: u32,
    peer: SocketAddr,
    directory: &PeerDirectory,
) -> Result<AuthKey, HandshakeError> {
    let hello: Hello = serde_json::from_str(line.trim())
        .map_err(|e| HandshakeError::Protocol(format!("bad request line: {e}")))?;
    if hello.remote != server_identity {
        return Err(HandshakeError::Refused(format!(
            "asked for identity {} but named {} in the SNI",
            hello.remote, server_identity
        )));
    }
    let want = directory
        .spiffe_ids
        .get(&hello.local)
        .ok_or_else(|| HandshakeError::Refused(format!("identity {} is unknown", hello.local)))?;
    let got = x509::inspect_leaf(client_leaf)
        .map_err(|e| HandshakeError::Refused(e.to_string()))?
        .spiffe_id;
    if got.to_string() != *want {
        return Err(HandshakeError::Refused(format!(
            "the client certificate is {got}, not identity {}'s {want}",
            hello.local
        )));
    }
    let (node_id, ips) = directory
        .nodes
        .get(&hello.node)
        .ok_or_else(|| HandshakeError::Refused(format!("node {} is unknown", hello.node)))?;
    if !ips.contains(&peer.ip()) {
        return Err(HandshakeError::Refused(format!(
            "the connection comes from {}, not from node {}'s addresses",
            peer.ip(),
            hello.node
        )));
    }
    Ok(super::pairs::key(server_identity, hello.local, *node_id))
}

/// Helper: cap how much a peer can make us buffer before the request line.
trait TakeLimited: Sized {
    fn take_limited(self) -> tokio::io::Take<Self>;
}

impl<R: tokio::io::AsyncRead> TakeLimited for R {
    fn take_limited(self) -> tokio::io::Take<Self> {
        tokio::io::AsyncReadExt::take(self, MAX_LINE as u64)
    }
}

/// One handshake the manager asks for: whom to dial, as whom, and whom to
/// expect.
#[derive(Debug, Clone)]
pub struct Dial {
    pub addr: SocketAddr,
    pub bundle: BundleWatch,
    /// The local SVID's signing key and chain.
    pub key: Arc<CertifiedKey>,
    pub local_id: u32,
    pub remote_id: u32,
    pub remote_spiffe_id: String,
    /// This node's name, which the peer checks against the SVID's node.
    pub node: String,
}

/// What a dial comes to: the pair's expiry (the earlier NotAfter of the two
/// leaves), or why not.
pub type DialFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<SystemTime, HandshakeError>> + Send>>;

/// How the manager reaches a peer's agent. The manager bounds every dial by
/// [`TIMEOUT`] itself, so a dialer need not. The agent's is [`TlsDialer`];
/// tests answer in memory.
pub trait Dialer: Send + Sync + std::fmt::Debug + 'static {
    fn dial(&self, to: Dial) -> DialFuture;
}

/// TLS 1.3 to the peer agent's auth port, both SVIDs checked.
#[derive(Debug, Default)]
pub struct TlsDialer;

impl Dialer for TlsDialer {
    fn dial(&self, d: Dial) -> DialFuture {
        Box::pin(async move {
            dial_inner(
                d.addr,
                d.bundle,
                d.key,
                d.local_id,
                d.remote_id,
                &d.remote_spiffe_id,
                &d.node,
            )
            .await
        })
    }
}

/// The dialer's side: authenticate `local` (whose SVID is `svid`) to
/// `remote_id` (`remote_spiffe_id`) at `addr`, speaking for `node`. Returns
/// the expiry of the pair: the earlier NotAfter of the two leaves.
pub async fn dial(
    addr: SocketAddr,
    bundle: BundleWatch,
    svid: &Svid,
    local_id: u32,
    remote_id: u32,
    remote_spiffe_id: &str,
    node: &str,
) -> Result<SystemTime, HandshakeError> {
    let ck = svid
        .certified_key()
        .map_err(|e| HandshakeError::Local(format!("the local SVID is unusable: {e}")))?;
    dial_with_key(addr, bundle, ck, local_id, remote_id, remote_spiffe_id, node).await
}

/// [`dial`] with the local SVID's signing key already loaded (the manager
/// keeps one per SVID instead of parsing the private key per handshake).
pub async fn dial_with_key(
    addr: SocketAddr,
    bundle: BundleWatch,
    ck: Arc<CertifiedKey>,
    local_id: u32,
    remote_id: u32,
    remote_spiffe_id: &str,
    node: &str,
) -> Result<SystemTime, HandshakeError> {
    tokio::time::timeout(
        TIMEOUT,
        dial_inner(addr, bundle, ck, local_id, remote_id, remote_spiffe_id, node),
    )
    .await
    .map_err(|_| HandshakeError::Timeout(TIMEOUT))?
}

async fn dial_inner(
    addr: SocketAddr,
    bundle: BundleWatch,
    ck: Arc<CertifiedKey>,
    local_id: u32,
    remote_id: u32,
    remote_spiffe_id: &str,
    node: &str,
) -> Result<SystemTime, HandshakeError> {
    let expected = SpiffeId::new(remote_spiffe_id)
        .map_err(|e| HandshakeError::Local(format!("identity {remote_id}: {e}")))?;
    let local_leaf = ck
        .cert
        .first()
        .cloned()
        .ok_or_else(|| HandshakeError::Local("the local SVID has no certificate".into()))?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| HandshakeError::Local(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(
            bundle,
            PeerMatch::Exact(expected),
        )))
        .with_client_cert_resolver(Arc::new(keyway_identity::tls::SvidResolver(
            watch::channel(Some(ck)).1,
        )));
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    let name = ServerName::try_from(sni_for(remote_id)).map_err(|e| HandshakeError::Local(e.to_string()))?;
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|source| HandshakeError::Connect { addr, source })?;
    let _ = tcp.set_nodelay(true);
    let tls = TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|source| HandshakeError::Tls { addr, source })?;
    let server_leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .cloned()
        .ok_or_else(|| HandshakeError::Protocol("no server certificate".into()))?;
    let expiry = earlier_not_after(&local_leaf, &server_leaf)?;
    let (read, mut write) = tokio::io::split(tls);
    let mut req = serde_json::to_vec(&Hello {
        local: local_id,
        remote: remote_id,
        node: node.to_string(),
    })
    .map_err(|e| HandshakeError::Local(e.to_string()))?;
    req.push(b'\n');
    write
        .write_all(&req)
        .await
        .map_err(|e| HandshakeError::Protocol(e.to_string()))?;
    let mut line = String::new();
    BufReader::new(read.take_limited())
        .read_line(&mut line)
        .await
        .map_err(|e| HandshakeError::Protocol(e.to_string()))?;
    let answer: Answer = serde_json::from_str(line.trim())
        .map_err(|e| HandshakeError::Protocol(format!("bad answer: {e}")))?;
    if !answer.ok {
        return Err(HandshakeError::Refused(answer.error));
    }
    Ok(expiry)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sni_names_an_identity_and_nothing_else() {
        assert_eq!(id_from_sni(&sni_for(302)), Some(302));
        assert_eq!(id_from_sni("id-302.example.com"), None);
        assert_eq!(id_from_sni("id-x.keyway-auth"), None);
        assert!(ServerName::try_from(sni_for(u32::MAX)).is_ok());
    }
}
