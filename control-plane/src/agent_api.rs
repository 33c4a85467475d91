//! The agent-facing gRPC API over TLS 1.3.
//!
//! The listener terminates TLS itself (rustls with SPIFFE verifiers reading the
//! live bundle) and hands tonic connections that carry the verified peer
//! SPIFFE ID. `Attest` is the only call that works without a client
//! certificate; everything else requires a node SVID of an attested node.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use keyway_identity::tls::{self, PeerMatch, SpiffeClientVerifier};
use keyway_identity::{SpiffeId, spiffe_id};
use proto::keyway::agent_api_server::{AgentApi, AgentApiServer};
use proto::keyway::{self as pb, attest_request::Method};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{debug, warn};

use crate::metrics::Refusal;
use crate::server::{ApiError, ControlPlane, NodeSvid};
use crate::sync;

/// Who is on the other end of a connection, as TLS established it.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub addr: SocketAddr,
    pub spiffe_id: Option<SpiffeId>,
}

/// A TLS connection handed to tonic.
#[derive(Debug)]
pub struct TlsConn {
    stream: TlsStream<TcpStream>,
    peer: PeerInfo,
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// How long a client gets to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts TCP connections and completes TLS handshakes concurrently; yields
/// established connections.
fn tls_incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    mut shutdown: watch::Receiver<bool>,
) -> ReceiverStream<Result<TlsConn, std::io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, addr) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(v) => v,
                    Err(e) => { warn!(error = %e, "accept failed"); continue; }
                },
                _ = shutdown.changed() => return,
            };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let spiffe_id = tls::peer_spiffe_id(stream.get_ref().1.peer_certificates());
                        let _ = tx
                            .send(Ok(TlsConn {
                                stream,
                                peer: PeerInfo { addr, spiffe_id },
                            }))
                            .await;
                    }
                    Ok(Err(e)) => debug!(%addr, error = %e, "TLS handshake failed"),
                    Err(_) => debug!(%addr, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Serves the agent API on `listener` until `shutdown` turns true.
pub async fn serve(
    cp: ControlPlane,
    listener: TcpListener,
    shutdown: watch::Receiver<bool>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let verifier = Arc::new(SpiffeClientVerifier::new(
        cp.subscribe_bundle(),
        PeerMatch::AnyInTrustDomain,
        false,
    ));
    let config = tls::server_config(cp.own_cert(), verifier)?;
    let incoming = tls_incoming(listener, TlsAcceptor::from(Arc::new(config)), shutdown.clone());
    cp.metrics().readiness.set_ready(crate::metrics::READY_AGENT_API);
    let service =
        AgentApiServer::new(AgentService { cp }).max_decoding_message_size(proto::MAX_AGENT_REQUEST_BYTES);
    let mut done = shutdown;
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = done.wait_for(|v| *v).await;
        })
        .await?;
    Ok(())
}

#[derive(Debug, Clone)]
struct AgentService {
    cp: ControlPlane,
}

fn node_svid_message(cp: &ControlPlane, svid: NodeSvid) -> pb::NodeSvid {
    pb::NodeSvid {
        spiffe_id: svid.spiffe_id.to_string(),
        cert_chain: svid.issued.chain,
        node_id: u32::from(svid.node.node_id),
        bundle: Some(sync::bundle_message(&cp.authority().bundle())),
    }
}

impl AgentService {
    /// The attested node behind a call, from its TLS client certificate.
    fn caller_node<T>(&self, req: &Request<T>) -> Result<String, Status> {
        let peer = req
            .extensions()
            .get::<PeerInfo>()
            .ok_or_else(|| Status::internal("connection has no peer information"))?;
        let id = peer.spiffe_id.as_ref().ok_or_else(|| {
            self.cp.count_refusal(Refusal::Unauthenticated);
            Status::unauthenticated(
                "this call needs the node SVID as the TLS client certificate; attest first",
            )
        })?;
        let td = self.cp.config().trust_domain.clone();
        let node = spiffe_id::node_name_of(id, &td).ok_or_else(|| {
            self.cp.count_refusal(Refusal::NotAttested);
            Status::permission_denied(format!("{id} is not a node agent identity"))
        })?;
        if self.cp.node(node).is_none() {
            self.cp.count_refusal(Refusal::NotAttested);
            return Err(Status::permission_denied(format!(
                "node {node} is not attested with this control plane"
            )));
        }
        Ok(node.to_owned())
    }
}

#[tonic::async_trait]
impl AgentApi for AgentService {
    async fn attest(&self, req: Request<pb::AttestRequest>) -> Result<Response<pb::AttestResponse>, Status> {
        let addr = req.extensions().get::<PeerInfo>().map(|p| p.addr);
        let req = req.into_inner();
        let result = match req.method {
            Some(Method::JoinToken(jt)) => {
                self.cp
                    .attest_join_token(&jt.token, &jt.node_name, &req.csr)
                    .await
            }
            Some(Method::Kubernetes(k)) => self.cp.attest_kubernetes(&k.token, &k.node_name, &req.csr).await,
            None => {
                self.cp.count_refusal(Refusal::BadRequest);
                Err(ApiError::InvalidArgument(
                    "attestation method missing: send a join token or a Kubernetes service account token"
                        .into(),
                ))
            }
        };
        match result {
            Ok(svid) => Ok(Response::new(pb::AttestResponse {
                svid: Some(node_svid_message(&self.cp, svid)),
            })),
            Err(e) => {
                // Once per peer and reason a minute: an agent retrying with
                // the same bad token does not flood the log.
                let ip = addr.map(|a| a.ip().to_string()).unwrap_or_default();
                if self
                    .cp
                    .metrics()
                    .refusal_log
                    .should_warn(&format!("attest/{ip}/{e}"))
                {
                    warn!(peer = ?addr, reason = %e, "attestation refused");
                } else {
                    debug!(peer = ?addr, reason = %e, "attestation refused (again)");
                }
                Err(e.into())
            }
        }
    }

    async fn renew_node_svid(
        &self,
        req: Request<pb::RenewNodeSvidRequest>,
    ) -> Result<Response<pb::NodeSvid>, Status> {
        let node = self.caller_node(&req)?;
        let svid = self.cp.renew_node_svid(&node, &req.into_inner().csr).await?;
        Ok(Response::new(node_svid_message(&self.cp, svid)))
    }

    async fn sign_workload_csr(
        &self,
        req: Request<pb::SignWorkloadCsrRequest>,
    ) -> Result<Response<pb::SignWorkloadCsrResponse>, Status> {
        let node = self.caller_node(&req)?;
        let req = req.into_inner();
        match self.cp.sign_workload_csr(&node, &req.spiffe_id, &req.csr).await {
            Ok((id, issued)) => Ok(Response::new(pb::SignWorkloadCsrResponse {
                spiffe_id: id.to_string(),
                cert_chain: issued.chain,
            })),
            Err(e) => {
                if self
                    .cp
                    .metrics()
                    .refusal_log
                    .should_warn(&format!("csr/{node}/{}/{e}", req.spiffe_id))
                {
                    warn!(node, spiffe_id = %req.spiffe_id, reason = %e, "workload CSR refused");
                } else {
                    debug!(node, spiffe_id = %req.spiffe_id, reason = %e, "workload CSR refused (again)");
                }
                Err(e.into())
            }
        }
    }

    async fn mint_workload_jwt(
        &self,
        req: Request<pb::MintWorkloadJwtRequest>,
    ) -> Result<Response<pb::MintJwtSvidResponse>, Status> {
        let node = self.caller_node(&req)?;
        let req = req.into_inner();
        let (token, expires_at_unix) = self.cp.mint_workload_jwt(&node, &req.spiffe_id, &req.audience)?;
        Ok(Response::new(pb::MintJwtSvidResponse {
            token,
            expires_at_unix,
        }))
    }

    type SyncStream = ReceiverStream<Result<pb::SyncResponse, Status>>;

    async fn sync(&self, req: Request<pb::SyncRequest>) -> Result<Response<Self::SyncStream>, Status> {
        let node = self.caller_node(&req)?;
        // Stored before the snapshot is taken, so this node's own entry in
        // the node table is current from the first message.
        if let Err(e) = self
            .cp
            .set_node_addresses(&node, &req.get_ref().auth_addresses)
            .await
        {
            warn!(node, reason = %e, "sync refused: cannot record the mutual-auth addresses");
            return Err(e.into());
        }
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(stream_sync(self.cp.clone(), node, tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// One node's sync stream: a snapshot, then deltas as the registry or the
/// bundle change. Ends when the client goes away.
async fn stream_sync(cp: ControlPlane, node: String, tx: mpsc::Sender<Result<pb::SyncResponse, Status>>) {
    let _open = cp.metrics().sync_stream();
    let mut registry = cp.subscribe_registry();
    let mut bundle = cp.subscribe_bundle();
    let cluster = registry.borrow_and_update().clone();
    let mut view = sync::node_view(&cluster, &node);
    let mut updates = vec![sync::bundle_update(&bundle.borrow_and_update())];
    updates.extend(sync::full(&view));
    let mut revision = cluster.records.revision;
    let chunks: Vec<Vec<pb::Update>> = updates
        .chunks(sync::UPDATES_PER_MESSAGE)
        .map(|c| c.to_vec())
        .collect();
    let last = chunks.len() - 1;
    for (i, chunk) in chunks.into_iter().enumerate() {
        let msg = pb::SyncResponse {
            revision,
            reset: i == 0,
            updates: chunk,
            complete: i == last,
        };
        if tx.send(Ok(msg)).await.is_err() {
            return;
        }
    }
    debug!(node, revision, "sync snapshot sent");
    loop {
        let updates = tokio::select! {
            r = registry.changed() => {
                if r.is_err() { return; }
                let cluster = registry.borrow_and_update().clone();
                revision = cluster.records.revision;
                let next = sync::node_view(&cluster, &node);
                let d = sync::diff(&view, &next);
                view = next;
                d
            }
            r = bundle.changed() => {
                if r.is_err() { return; }
                vec![sync::bundle_update(&bundle.borrow_and_update())]
            }
            _ = tx.closed() => return,
        };
        // A delta split over several messages is complete (consistent, worth
        // acting on) only at its last message.
        let chunks: Vec<&[pb::Update]> = updates.chunks(sync::UPDATES_PER_MESSAGE).collect();
        let last = chunks.len().saturating_sub(1);
        for (i, chunk) in chunks.into_iter().enumerate() {
            let msg = pb::SyncResponse {
                revision,
                reset: false,
                updates: chunk.to_vec(),
                complete: i == last,
            };
            if tx.send(Ok(msg)).await.is_err() {
                return;
            }
        }
    }
}
