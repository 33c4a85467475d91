//! The agent-facing gRPC API over TLS 1.3.
//!
//! The listener terminates TLS itself (rustls with SPIFFE verifiers reading the
//! live bundle) and hands tonic connections that carry the verified peer
//! SPIFFE ID. `Attest` is the only call that works without a client
//! certificate; everything else requires a node SVID of an attested node.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use keyway_identity::tls::{self, PeerMatch, SpiffeClientVerifier};
use keyway_identity::{SpiffeId, spiffe_id};
use keyway_serve::{Gate, PeerKey};
use proto::keyway::agent_api_server::{AgentApi, AgentApiServer};
use proto::keyway::{self as pb, attest_request::Method};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

use crate::attest;
use crate::core::{ControlPlane, NodeSvid};
use crate::error::ApiError;
use crate::metrics::Refusal;
use crate::sync;

/// Who is on the other end of a connection, as TLS established it.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub addr: SocketAddr,
    pub spiffe_id: Option<SpiffeId>,
    /// The tag in the client certificate's serial number: a node SVID of
    /// an earlier (revoked) registration of its node is refused.
    pub serial_tag: Option<u32>,
}

/// Serves the agent API on `listener` until `shutdown` turns true. Each
/// connection is admitted by the listener's gate (total and per source
/// address), gets the header timeout for its TLS handshake and first
/// request, and is closed when idle (see `keyway_serve`).
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
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let gate = Gate::new(
        "agent_api",
        cp.config().agent_api_limits.clone(),
        cp.metrics().listeners.clone(),
    );
    let routes = tonic::service::Routes::new(
        AgentApiServer::new(AgentService { cp: cp.clone() })
            .max_decoding_message_size(proto::MAX_AGENT_REQUEST_BYTES),
    );
    cp.metrics().readiness.set_ready(crate::metrics::READY_AGENT_API);
    let mut stop = shutdown.clone();
    if *stop.borrow_and_update() {
        return Ok(());
    }
    loop {
        let (tcp, addr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(v) => v,
                Err(e) => {
                    gate.accept_failed(&e);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => return Ok(()),
        };
        let opened = tokio::time::Instant::now();
        let Ok(permit) = gate.admit(PeerKey::ip(addr.ip())) else {
            continue;
        };
        let acceptor = acceptor.clone();
        let gate = gate.clone();
        let routes = routes.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = tcp.set_nodelay(true);
            let stream = match tokio::time::timeout_at(
                opened + gate.limits().request_header_timeout,
                acceptor.accept(tcp),
            )
            .await
            {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    debug!(%addr, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    gate.closed(keyway_serve::Closed::HandshakeTimeout);
                    debug!(%addr, "TLS handshake timed out");
                    return;
                }
            };
            let leaf = tls::peer_leaf(stream.get_ref().1.peer_certificates());
            let serial_tag = leaf.as_ref().and_then(|l| crate::ca::serial_tag(&l.serial));
            let spiffe_id = leaf.map(|l| l.spiffe_id);
            let peer = PeerInfo {
                addr,
                spiffe_id,
                serial_tag,
            };
            keyway_serve::grpc::serve_connection(&gate, opened, stream, peer, routes, shutdown).await;
        });
    }
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
        self.cp.authenticate_node(node, peer.serial_tag)?;
        Ok(node.to_owned())
    }
}

#[tonic::async_trait]
impl AgentApi for AgentService {
    async fn attest(&self, req: Request<pb::AttestRequest>) -> Result<Response<pb::AttestResponse>, Status> {
        let addr = req.extensions().get::<PeerInfo>().map(|p| p.addr);
        if let Some(a) = addr
            && !self.cp.attest_admitted(a.ip())
        {
            return Err(Status::resource_exhausted(
                "too many attestation attempts from this address; retry in a few seconds",
            ));
        }
        let req = req.into_inner();
        let result = match req.method {
            Some(Method::JoinToken(jt)) => {
                self.cp
                    .attest(attest::Method::JoinToken, &jt.token, &jt.node_name, &req.csr)
                    .await
            }
            Some(Method::Kubernetes(k)) => {
                self.cp
                    .attest(attest::Method::Kubernetes, &k.token, &k.node_name, &req.csr)
                    .await
            }
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
                // Once per peer and kind of refusal a minute: an agent
                // retrying with the same bad token does not flood the log,
                // and the key never holds what the caller sent (the
                // message repeats at most a bounded prefix of it).
                let ip = addr.map(|a| a.ip().to_string()).unwrap_or_default();
                if self
                    .cp
                    .metrics()
                    .refusal_log
                    .should_warn(&format!("attest/{ip}/{}", e.code_name()))
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
                    .should_warn(&format!("csr/{node}/{}", e.code_name()))
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
        let serial_tag = req.extensions().get::<PeerInfo>().and_then(|p| p.serial_tag);
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
        // A few messages ahead of the client: a snapshot is produced as the
        // client reads it (memory per stream stays at a few hundred updates).
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(stream_sync(self.cp.clone(), node, serial_tag, tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// One node's sync stream: a snapshot, then deltas as the registry or the
/// bundle change. Ends when the client goes away, or with PermissionDenied
/// when the node is revoked (its SVID no longer authenticates it).
async fn stream_sync(
    cp: ControlPlane,
    node: String,
    serial_tag: Option<u32>,
    tx: mpsc::Sender<Result<pb::SyncResponse, Status>>,
) {
    let _open = cp.metrics().sync_stream();
    // A control plane still reading the cluster (Kubernetes mode, watch
    // caches not synced) sends nothing yet: the agent keeps the view it
    // holds instead of being sent an empty one.
    tokio::select! {
        () = cp.view_ready() => {}
        () = tx.closed() => return,
    }
    let mut clusters = cp.subscribe_cluster();
    let mut bundle = cp.subscribe_bundle();
    let mut stream = sync::Stream::open(&clusters.borrow(), &node);
    if send_snapshot(
        &cp,
        &node,
        serial_tag,
        &mut clusters,
        &mut bundle,
        &mut stream,
        &tx,
    )
    .await
    .is_err()
    {
        return;
    }
    debug!(node, "sync snapshot sent");
    loop {
        tokio::select! {
            r = clusters.changed() => {
                if r.is_err() { return; }
                let (revision, out) = {
                    let cluster = clusters.borrow_and_update().clone();
                    if let Err(e) = cp.authenticate_node(&node, serial_tag) {
                        info!(node, "closing the Sync stream of a revoked node");
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                    (cluster.records.revision, stream.advance(&cluster))
                };
                let sent = match out {
                    // Nothing of this node's view changed: nothing is sent.
                    sync::Outgoing::Delta(updates) if updates.is_empty() => Ok(()),
                    sync::Outgoing::Delta(updates) => send_updates(revision, false, updates, &tx).await,
                    sync::Outgoing::Snapshot => {
                        debug!(node, "sync stream fell behind the change history: sending a snapshot");
                        send_snapshot(&cp, &node, serial_tag, &mut clusters, &mut bundle, &mut stream, &tx).await
                    }
                };
                if sent.is_err() {
                    return;
                }
            }
            r = bundle.changed() => {
                if r.is_err() { return; }
                let update = sync::bundle_update(&bundle.borrow_and_update());
                let revision = clusters.borrow().records.revision;
                if send_updates(revision, false, vec![update], &tx).await.is_err() {
                    return;
                }
            }
            _ = tx.closed() => return,
        }
    }
}

/// Snapshots read from the newest version that may restart (a reader so
/// slow that the change history no longer reaches back to where it began)
/// before the next one is read from one pinned version instead.
const SNAPSHOT_RESTARTS: u32 = 2;

/// Sends `stream`'s node a whole snapshot (`reset`), the bundle first. Each
/// page is read from the newest registry version and nothing is held while
/// the client reads, so a slow reader pins no version of the registry. The
/// last page carries the changes made meanwhile (since the version the
/// snapshot opened at), and only it is `complete`. A reader too slow for
/// that, twice, is sent its next snapshot from one pinned version (complete
/// as it stands; the deltas follow). `Err` when the client went away or the
/// node was revoked (the client is told).
async fn send_snapshot(
    cp: &ControlPlane,
    node: &str,
    serial_tag: Option<u32>,
    clusters: &mut watch::Receiver<Arc<sync::Cluster>>,
    bundle: &mut watch::Receiver<Arc<keyway_identity::TrustBundle>>,
    stream: &mut sync::Stream,
    tx: &mpsc::Sender<Result<pb::SyncResponse, Status>>,
) -> Result<(), ()> {
    for attempt in 0.. {
        if let Err(e) = cp.authenticate_node(node, serial_tag) {
            info!(node, "closing the Sync stream of a revoked node");
            let _ = tx.send(Err(e.into())).await;
            return Err(());
        }
        let pinned = (attempt >= SNAPSHOT_RESTARTS).then(|| clusters.borrow_and_update().clone());
        if pinned.is_some() {
            debug!(
                node,
                "sync stream too slow for the change history: snapshot from one version"
            );
        }
        match &pinned {
            Some(c) => stream.reopen(c),
            None => stream.reopen(&clusters.borrow_and_update()),
        }
        let mut cursor = sync::SnapshotCursor::default();
        let mut first = Some(sync::bundle_update(&bundle.borrow_and_update()));
        loop {
            let (revision, mut updates, catch_up) = {
                let cluster = match &pinned {
                    Some(c) => c.clone(),
                    None => clusters.borrow_and_update().clone(),
                };
                let mut updates: Vec<pb::Update> = first.iter().cloned().collect();
                let room = sync::UPDATES_PER_MESSAGE - updates.len();
                updates.extend(stream.snapshot_page(&mut cursor, &cluster, room));
                let catch_up = cursor.done().then(|| stream.advance(&cluster));
                (cluster.records.revision, updates, catch_up)
            };
            let reset = first.take().is_some();
            match catch_up {
                None => {
                    let msg = pb::SyncResponse {
                        revision,
                        reset,
                        updates,
                        complete: false,
                    };
                    tx.send(Ok(msg)).await.map_err(|_| ())?;
                }
                Some(sync::Outgoing::Delta(changed)) => {
                    updates.extend(changed);
                    return send_updates(revision, reset, updates, tx).await;
                }
                // So many changes while the snapshot was read that the
                // history no longer reaches its start: read it again.
                Some(sync::Outgoing::Snapshot) => break,
            }
        }
    }
    Ok(())
}

/// Sends `updates` in messages of at most [`sync::UPDATES_PER_MESSAGE`];
/// a delta split over several messages is complete (consistent, worth acting
/// on) only at its last message, and at least that one message is sent.
async fn send_updates(
    revision: u64,
    reset: bool,
    updates: Vec<pb::Update>,
    tx: &mpsc::Sender<Result<pb::SyncResponse, Status>>,
) -> Result<(), ()> {
    let mut updates = updates.into_iter().peekable();
    let mut reset = reset;
    loop {
        let chunk: Vec<pb::Update> = updates.by_ref().take(sync::UPDATES_PER_MESSAGE).collect();
        let complete = updates.peek().is_none();
        let msg = pb::SyncResponse {
            revision,
            reset,
            updates: chunk,
            complete,
        };
        tx.send(Ok(msg)).await.map_err(|_| ())?;
        reset = false;
        if complete {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::CaConfig;
    use crate::config::Config;
    use crate::core::SourcedChanges;
    use crate::model::WorkloadRecord;
    use crate::store::SledStore;

    /// A Kubernetes-mode control plane (sled store) and one node attested
    /// with a join token: the control plane, and that node's serial tag.
    async fn kubernetes_mode(dir: &std::path::Path) -> (ControlPlane, Option<u32>) {
        let td = spiffe_id::parse_trust_domain("example.org").unwrap();
        let config = Config {
            trust_domain: td.clone(),
            data_dir: dir.to_owned(),
            listen: "127.0.0.1:0".parse().unwrap(),
            admin_socket: dir.join("admin.sock"),
            svid_ttl: Duration::from_secs(3600),
            node_svid_ttl: Duration::from_secs(3600),
            jwt_ttl: Duration::from_secs(300),
            ca_ttl: Duration::from_secs(86400),
            upstream_ca: None,
            kubernetes: true,
            allow_join_tokens: true,
            attest_per_minute: 0,
            agent_api_limits: crate::config::agent_api_limits(),
            policy_budget: Default::default(),
            identity_gc_grace: Duration::from_secs(3600),
            issuance_retention: Default::default(),
        };
        let ca = CaConfig {
            trust_domain: td,
            ca_ttl: config.ca_ttl,
            upstream: None,
        };
        let store = Arc::new(SledStore::open(dir).unwrap());
        let cp = ControlPlane::open(config, ca, store).await.unwrap();
        cp.read_workloads_from_kubernetes();
        let (token, _) = cp
            .create_join_token("n1", Duration::from_secs(600))
            .await
            .unwrap();
        let (_key, csr) = keyway_identity::csr::generate().unwrap();
        let svid = cp
            .attest(crate::attest::Method::JoinToken, &token, "n1", &csr)
            .await
            .unwrap();
        let tag = (svid.node.registration != 0).then_some(svid.node.registration);
        (cp, tag)
    }

    fn pod(name: &str) -> (String, Option<WorkloadRecord>) {
        let w = WorkloadRecord {
            namespace: "default".into(),
            name: name.into(),
            service_account: "web".into(),
            node: "n1".into(),
            ips: vec!["10.0.0.7".into()],
            labels: Default::default(),
            selectors: vec![],
            svid_ttl_secs: None,
            identity: 0,
            spiffe_id: String::new(),
        };
        (w.key(), Some(w))
    }

    /// Reads messages until one is complete; returns whether the first was
    /// a reset, and the workloads of the state the stream described.
    async fn next_state(rx: &mut mpsc::Receiver<Result<pb::SyncResponse, Status>>) -> (bool, Vec<String>) {
        let mut reset = None;
        let mut workloads = Vec::new();
        loop {
            let msg = rx.recv().await.expect("stream open").expect("no error");
            reset.get_or_insert(msg.reset);
            for u in msg.updates {
                if let Some(pb::update::Kind::WorkloadUpsert(w)) = u.kind {
                    workloads.push(w.name);
                }
            }
            if msg.complete {
                return (reset.unwrap_or(false), workloads);
            }
        }
    }

    /// A restarted control plane whose watch caches have not synced knows
    /// no pod. Were it to send a connecting agent its view, that view would
    /// be complete and empty, and the agent would withdraw every pod's
    /// entries (policy denies their traffic) until the caches synced; at
    /// scale, every agent reconnecting at once was also sent the whole
    /// cluster again as one delta, held in memory per stream.
    #[tokio::test]
    async fn a_sync_stream_waits_for_the_watch_caches_before_sending_a_view() {
        let dir = tempfile::tempdir().unwrap();
        let (cp, tag) = kubernetes_mode(dir.path()).await;
        let (tx, mut rx) = mpsc::channel(4);
        tokio::spawn(stream_sync(cp.clone(), "n1".into(), tag, tx));

        // Paused, the clock jumps ahead whenever every task waits: an hour
        // passes at once unless the stream sends something.
        tokio::time::pause();
        let early = tokio::time::timeout(Duration::from_secs(3600), rx.recv()).await;
        if let Ok(Some(Ok(sent))) = &early {
            panic!(
                "a view was sent before the caches synced (complete: {}, {} updates)",
                sent.complete,
                sent.updates.len()
            );
        }
        assert!(early.is_err(), "the stream ended before the caches synced");
        tokio::time::resume();

        cp.apply_sourced(SourcedChanges {
            workloads: vec![pod("web-1")],
            policies: vec![],
        })
        .await
        .unwrap();
        cp.sourced_synced();
        let (reset, workloads) = next_state(&mut rx).await;
        assert!(reset, "the first state is a snapshot");
        assert_eq!(
            workloads,
            vec!["web-1"],
            "the first complete state has the node's pods"
        );
    }
}
