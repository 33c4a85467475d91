//! The agent's client of the control plane's agent API: attestation over
//! server-authenticated TLS, then mTLS with the node SVID for everything else.
//! Keys are generated here and never sent: the control plane only sees CSRs.

use std::sync::Arc;

use hyper_util::rt::TokioIo;
use keyway_identity::tls::{self, BundleWatch, CertWatch, PeerMatch};
use keyway_identity::{Svid, TrustBundle, spiffe_id};
use proto::keyway::agent_api_client::AgentApiClient;
use proto::keyway::{self as pb};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the control plane at {server}: {reason}")]
    Connect { server: String, reason: String },
    #[error("the control plane refused the call: {} ({:?})", .0.message(), .0.code())]
    Refused(tonic::Status),
    #[error("the control plane's answer is unusable: {0}")]
    BadResponse(String),
    #[error("key generation failed: {0}")]
    Key(String),
    #[error("{0}")]
    Credential(String),
}

impl From<tonic::Status> for ClientError {
    fn from(s: tonic::Status) -> Self {
        ClientError::Refused(s)
    }
}

/// What attestation gives a node.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    pub svid: Svid,
    pub node_id: u32,
    pub bundle: Arc<TrustBundle>,
}

/// Builds a bundle from the control plane's message.
pub fn bundle_from(msg: &pb::Bundle) -> Result<TrustBundle, ClientError> {
    let td = spiffe_id::parse_trust_domain(&msg.trust_domain)
        .map_err(|e| ClientError::BadResponse(e.to_string()))?;
    TrustBundle::new(td, msg.sequence, msg.x509_authorities.clone(), msg.jwks.clone())
        .map_err(|e| ClientError::BadResponse(e.to_string()))
}

fn node_identity(msg: pb::NodeSvid, key: rcgen::KeyPair) -> Result<NodeIdentity, ClientError> {
    let bundle = msg
        .bundle
        .as_ref()
        .ok_or_else(|| ClientError::BadResponse("no bundle".into()))?;
    let bundle = Arc::new(bundle_from(bundle)?);
    let svid = Svid::new(msg.cert_chain, key.serialize_der())
        .map_err(|e| ClientError::BadResponse(e.to_string()))?;
    Ok(NodeIdentity {
        svid,
        node_id: msg.node_id,
        bundle,
    })
}

/// A gRPC channel to `server` (HOST:PORT) over TLS 1.3, verifying that the
/// server is the control plane of the bundle's trust domain.
pub async fn channel(
    server: &str,
    bundle: BundleWatch,
    cert: Option<CertWatch>,
) -> Result<Channel, ClientError> {
    let td = bundle.borrow().trust_domain().clone();
    let config = tls::client_config(bundle, PeerMatch::Exact(spiffe_id::control_plane_id(&td)), cert)
        .map_err(|e| ClientError::Connect {
            server: server.to_owned(),
            reason: e.to_string(),
        })?;
    let connector = TlsConnector::from(Arc::new(config));
    let addr = server.to_owned();
    Endpoint::from_shared(format!("http://{server}"))
        .map_err(|e| ClientError::Connect {
            server: server.to_owned(),
            reason: e.to_string(),
        })?
        .connect_timeout(std::time::Duration::from_secs(10))
        .connect_with_connector(tower::service_fn(move |_| {
            let connector = connector.clone();
            let addr = addr.clone();
            async move {
                let tcp = TcpStream::connect(&addr).await?;
                tcp.set_nodelay(true)?;
                // The name is not checked (the verifier matches the SPIFFE ID).
                let name = ServerName::try_from("keyway-control-plane").map_err(std::io::Error::other)?;
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await
        .map_err(|e| ClientError::Connect {
            server: server.to_owned(),
            reason: format!(
                "{e}: {}",
                std::error::Error::source(&e)
                    .map(|s| s.to_string())
                    .unwrap_or_default()
            ),
        })
}

/// How a node proves who it is the first time (or after its node SVID expired).
#[derive(Debug, Clone)]
pub enum Attestation {
    /// A single-use join token from `control-plane token create`.
    JoinToken(String),
    /// A projected service account token (audience `keyway`) read from this
    /// file at every attempt: the kubelet rotates it.
    KubernetesToken(std::path::PathBuf),
}

impl Attestation {
    /// How the log and errors name it.
    pub fn describe(&self) -> &'static str {
        match self {
            Attestation::JoinToken(_) => "a join token",
            Attestation::KubernetesToken(_) => "a Kubernetes service account token",
        }
    }

    fn method(&self, node_name: &str) -> Result<pb::attest_request::Method, ClientError> {
        Ok(match self {
            Attestation::JoinToken(token) => {
                pb::attest_request::Method::JoinToken(pb::JoinTokenAttestation {
                    token: token.clone(),
                    node_name: node_name.to_owned(),
                })
            }
            Attestation::KubernetesToken(path) => {
                let token = std::fs::read_to_string(path).map_err(|e| {
                    ClientError::Credential(format!(
                        "--k8s-token-file {}: cannot read the projected service account token: {e}",
                        path.display()
                    ))
                })?;
                pb::attest_request::Method::Kubernetes(pb::KubernetesAttestation {
                    token: token.trim().to_owned(),
                    node_name: node_name.to_owned(),
                })
            }
        })
    }
}

/// Attests with a single-use join token and returns the node SVID.
pub async fn attest_with_join_token(
    server: &str,
    bundle: Arc<TrustBundle>,
    node_name: &str,
    token: &str,
) -> Result<NodeIdentity, ClientError> {
    attest(
        server,
        bundle,
        node_name,
        &Attestation::JoinToken(token.to_owned()),
    )
    .await
}

/// Attests and returns the node SVID.
pub async fn attest(
    server: &str,
    bundle: Arc<TrustBundle>,
    node_name: &str,
    how: &Attestation,
) -> Result<NodeIdentity, ClientError> {
    let (_tx, rx) = watch::channel(bundle);
    let mut client = AgentApiClient::new(channel(server, rx, None).await?);
    let (key, csr) = keyway_identity::csr::generate().map_err(|e| ClientError::Key(e.to_string()))?;
    let resp = client
        .attest(pb::AttestRequest {
            method: Some(how.method(node_name)?),
            csr,
        })
        .await?
        .into_inner();
    node_identity(
        resp.svid
            .ok_or_else(|| ClientError::BadResponse("no SVID".into()))?,
        key,
    )
}

/// An mTLS client authenticated with the node SVID.
#[derive(Debug, Clone)]
pub struct ControlPlaneClient {
    client: AgentApiClient<Channel>,
}

impl ControlPlaneClient {
    pub async fn connect(server: &str, bundle: BundleWatch, cert: CertWatch) -> Result<Self, ClientError> {
        Ok(Self {
            client: AgentApiClient::new(channel(server, bundle, Some(cert)).await?),
        })
    }

    /// The raw generated client, for calls this wrapper does not cover.
    pub fn raw(&mut self) -> &mut AgentApiClient<Channel> {
        &mut self.client
    }

    /// A new node SVID for a new key.
    pub async fn renew_node_svid(&mut self) -> Result<NodeIdentity, ClientError> {
        let (key, csr) = keyway_identity::csr::generate().map_err(|e| ClientError::Key(e.to_string()))?;
        let resp = self
            .client
            .renew_node_svid(pb::RenewNodeSvidRequest { csr })
            .await?
            .into_inner();
        node_identity(resp, key)
    }

    /// An X509-SVID for a workload identity placed on this node.
    pub async fn sign_workload(&mut self, spiffe_id: &str) -> Result<Svid, ClientError> {
        let (key, csr) = keyway_identity::csr::generate().map_err(|e| ClientError::Key(e.to_string()))?;
        let resp = self
            .client
            .sign_workload_csr(pb::SignWorkloadCsrRequest {
                spiffe_id: spiffe_id.to_owned(),
                csr,
            })
            .await?
            .into_inner();
        Svid::new(resp.cert_chain, key.serialize_der()).map_err(|e| ClientError::BadResponse(e.to_string()))
    }

    /// Opens the sync stream, advertising where this node's agent takes
    /// mutual-auth handshakes (`IP:PORT`; the control plane refuses the
    /// call with InvalidArgument if one is not a dialable socket address).
    pub async fn sync(
        &mut self,
        known_revision: u64,
        auth_addresses: Vec<String>,
    ) -> Result<tonic::Streaming<pb::SyncResponse>, ClientError> {
        Ok(self
            .client
            .sync(pb::SyncRequest {
                known_revision,
                auth_addresses,
            })
            .await?
            .into_inner())
    }
}
