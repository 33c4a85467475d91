//! The running agent: its node identity, the link to the control plane (mTLS,
//! Sync, node SVID renewal, reconnect with backoff), the SVID cache and the
//! Workload API, wired together with `watch` channels. Each piece of state has
//! one owner task.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime};

use keyway_identity::{Svid, TrustBundle, TrustDomain};
use rustls::sign::CertifiedKey;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::backoff::Backoff;
use crate::control_plane::{self, ClientError, ControlPlaneClient};
use crate::node_svid;
use crate::state::NodeState;
use crate::svid_cache::{SvidCache, renew_after};
use crate::telemetry::Telemetry;
use keyway_identity::lock::Recover;
use keyway_serve::telemetry::{Registry, gauge_value};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

/// Validated `node-agent run` configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub server: String,
    pub trust_domain: TrustDomain,
    pub trust_bundle: PathBuf,
    pub node_name: String,
    pub data_dir: PathBuf,
    pub join_token: Option<String>,
    /// Kubernetes: the projected service account token (audience `keyway`)
    /// to attest with instead of a join token.
    pub k8s_token_file: Option<PathBuf>,
    pub socket: PathBuf,
    pub netns_dir: PathBuf,
    pub proc_root: PathBuf,
    /// Where peers reach this node's mutual-auth port (`IP:PORT`), sent in
    /// every SyncRequest so the control plane puts them in every node's node
    /// table. Empty: this node takes no handshakes.
    pub auth_addresses: Vec<String>,
    /// What the Workload API listener allows (connections in total and per
    /// caller, timeouts).
    pub workload_api_limits: keyway_serve::Limits,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    Config(String),
    #[error("attestation failed: {0}")]
    Attestation(ClientError),
    #[error(transparent)]
    Disk(#[from] node_svid::DiskError),
    #[error("workload API socket {path}: {source}")]
    Socket { path: PathBuf, source: std::io::Error },
}

/// Handles the rest of the agent reads.
#[derive(Debug, Clone)]
pub struct AgentHandles {
    pub state: watch::Receiver<Arc<NodeState>>,
    pub svids: watch::Receiver<crate::svid_cache::SvidSet>,
    pub client: watch::Receiver<Option<ControlPlaneClient>>,
    pub rotations: watch::Receiver<u64>,
    /// The registry the agent's subsystems register their metrics in, and
    /// its readiness.
    pub telemetry: Telemetry,
}

/// Readiness components of the agent: `/readyz` answers 200 once each is
/// ready. The node SVID and the first complete Sync are decided here, the
/// Workload API by its server once it serves.
pub const READY_NODE_SVID: &str = "node_svid";
pub const READY_FIRST_SYNC: &str = "first_sync";
pub const READY_WORKLOAD_API: &str = "workload_api";
/// Only with `--datapath` (`node-agent run` expects it then).
pub const READY_DATAPATH: &str = "datapath";
/// What every agent waits for.
pub const READY_COMPONENTS: &[&str] = &[READY_NODE_SVID, READY_FIRST_SYNC, READY_WORKLOAD_API];

/// How long one attestation call may take before it counts as unanswered.
const ATTEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether a failed attestation is the control plane's final word (the token,
/// the pod or the node is refused) rather than a passing condition: it, or
/// the API server it asks, is unreachable, restarting, busy or rate limiting.
fn is_final(e: &ClientError) -> bool {
    match e {
        ClientError::Credential(_) => true,
        ClientError::Refused(s) => matches!(
            s.code(),
            tonic::Code::PermissionDenied
                | tonic::Code::InvalidArgument
                | tonic::Code::Unauthenticated
                | tonic::Code::FailedPrecondition
        ),
        _ => false,
    }
}

/// Finds or obtains the node SVID.
///
/// - On Kubernetes (`--k8s-token-file`) the agent attests with its pod's
///   projected token at every start, so the identity it serves from is bound
///   to a live agent pod of this node (the control plane checks the token with
///   TokenReview), as SPIRE's `k8s_psat` re-attests. The node keeps its node
///   id and registration. A stored, still-valid SVID is only the fallback
///   when about 20 s of attempts got no answer, or only passing errors (see
///   [`is_final`]), so workloads keep being served through an outage; a
///   refusal is final. After a fallback the agent renews the stored SVID over
///   mTLS as before and does not attest again until it restarts (a gap: the
///   control plane checks renewals against the node's registration, not the
///   pod).
/// - With join tokens (single-use) a stored, still-valid SVID is used: no new
///   token is needed after a restart. Without one, the join token attests.
async fn node_identity(cfg: &AgentConfig, bundle: Arc<TrustBundle>) -> Result<Svid, AgentError> {
    let stored = match node_svid::load_svid(&cfg.data_dir)? {
        Some(svid) if cfg.k8s_token_file.is_none() => {
            info!(spiffe_id = %svid.spiffe_id(), "using the stored node SVID");
            return Ok(svid);
        }
        other => other,
    };
    let how = match (&cfg.k8s_token_file, &cfg.join_token) {
        (Some(path), _) => control_plane::Attestation::KubernetesToken(path.clone()),
        (None, Some(token)) => control_plane::Attestation::JoinToken(token.clone()),
        (None, None) => {
            return Err(AgentError::Config(format!(
                "no valid node SVID in {} and no way to attest: pass --join-token (create one with \
                 `control-plane token create --node {}`) or, on Kubernetes, --k8s-token-file",
                cfg.data_dir.display(),
                cfg.node_name
            )));
        }
    };
    // With a stored SVID to fall back on, about 20 s of attempts; without
    // one, a few minutes (the control plane may be starting too).
    let max_attempts = if stored.is_some() { 8 } else { 20 };
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    let mut attempts = 0;
    let id = loop {
        let attempt = control_plane::attest(&cfg.server, bundle.clone(), &cfg.node_name, &how);
        let result = match tokio::time::timeout(ATTEST_TIMEOUT, attempt).await {
            Ok(r) => r,
            Err(_) => Err(ClientError::Connect {
                server: cfg.server.clone(),
                reason: format!("no answer to the attestation within {ATTEST_TIMEOUT:?}"),
            }),
        };
        match result {
            Ok(id) => break id,
            // A refusal is final (the token is bad, or this pod is not an
            // agent of this node): never serve from an older identity then.
            Err(e) if is_final(&e) => return Err(AgentError::Attestation(e)),
            Err(e) if attempts + 1 >= max_attempts => match stored {
                Some(svid) => {
                    warn!(error = %e, spiffe_id = %svid.spiffe_id(),
                        "cannot attest now; serving from the stored node SVID (renewed over mTLS; \
                         attestation with the token happens again at the next start)");
                    return Ok(svid);
                }
                None => return Err(AgentError::Attestation(e)),
            },
            Err(e) => {
                attempts += 1;
                warn!(error = %e, "cannot reach the control plane to attest; retrying");
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    };
    node_svid::save_svid(&cfg.data_dir, &id.svid)?;
    node_svid::save_bundle(&cfg.data_dir, &id.bundle)?;
    info!(spiffe_id = %id.svid.spiffe_id(), node_id = id.node_id, "attested with {}", how.describe());
    Ok(id.svid)
}

/// Starts the agent's background tasks; returns once the node identity is
/// established. Everything stops when `shutdown` turns true.
pub async fn start(cfg: AgentConfig, shutdown: watch::Receiver<bool>) -> Result<AgentHandles, AgentError> {
    let telemetry = Telemetry::new(READY_COMPONENTS);
    let metrics = CoreMetrics::register(&telemetry.registry);
    start_with_telemetry(cfg, telemetry, metrics, shutdown).await
}

/// Like [`start`], registering into `telemetry` (what the `/metrics`
/// listener serves, started before attestation so `/readyz` answers 503
/// meanwhile).
pub async fn start_with_telemetry(
    cfg: AgentConfig,
    telemetry: Telemetry,
    metrics: CoreMetrics,
    shutdown: watch::Receiver<bool>,
) -> Result<AgentHandles, AgentError> {
    node_svid::prepare_dir(&cfg.data_dir)?;
    let initial_bundle = match node_svid::load_bundle(&cfg.data_dir, &cfg.trust_domain)? {
        Some(b) => b,
        None => {
            let pem = std::fs::read_to_string(&cfg.trust_bundle).map_err(|e| {
                AgentError::Config(format!(
                    "--trust-bundle: cannot read {}: {e}",
                    cfg.trust_bundle.display()
                ))
            })?;
            TrustBundle::from_pem(cfg.trust_domain.clone(), &pem).map_err(|e| {
                AgentError::Config(format!("--trust-bundle {}: {e}", cfg.trust_bundle.display()))
            })?
        }
    };
    let bundle = Arc::new(initial_bundle);
    let svid = node_identity(&cfg, bundle.clone()).await?;
    let certified = svid
        .certified_key()
        .map_err(|e| AgentError::Config(format!("node SVID unusable: {e}")))?;
    let (bundle_tx, bundle_rx) = watch::channel(bundle);
    let (cert_tx, cert_rx) = watch::channel(Some(certified));
    let (state_tx, state_rx) = watch::channel(Arc::new(NodeState::default()));
    let (client_tx, client_rx) = watch::channel(None);
    let cache = Arc::new(SvidCache::new());
    let handles = AgentHandles {
        state: state_rx.clone(),
        svids: cache.subscribe(),
        client: client_rx.clone(),
        rotations: cache.rotations(),
        telemetry,
    };
    watch_for_telemetry(&handles, metrics, shutdown.clone());
    let link = Link {
        cfg: cfg.clone(),
        node_svid: svid,
        bundle_tx,
        bundle_rx,
        cert_tx,
        cert_rx,
        state_tx,
        client_tx,
    };
    tokio::spawn(link.run(shutdown.clone()));
    tokio::spawn({
        let cache = cache.clone();
        let shutdown = shutdown.clone();
        async move { cache.run(state_rx, client_rx, shutdown).await }
    });
    Ok(handles)
}

/// The one owner of the connection to the control plane.
struct Link {
    cfg: AgentConfig,
    node_svid: Svid,
    bundle_tx: watch::Sender<Arc<TrustBundle>>,
    bundle_rx: watch::Receiver<Arc<TrustBundle>>,
    cert_tx: watch::Sender<Option<Arc<CertifiedKey>>>,
    cert_rx: watch::Receiver<Option<Arc<CertifiedKey>>>,
    state_tx: watch::Sender<Arc<NodeState>>,
    client_tx: watch::Sender<Option<ControlPlaneClient>>,
}

impl Link {
    async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
        let mut logged = false;
        loop {
            let result = tokio::select! {
                r = self.session(&mut backoff) => r,
                _ = shutdown.changed() => return,
            };
            // A session that got connected earns a fresh log line next time.
            if self.client_tx.send_replace(None).is_some() {
                logged = false;
            }
            if let Err(e) = result
                && !logged
            {
                warn!(server = %self.cfg.server, error = %e, "lost the control plane; serving cached SVIDs and reconnecting");
                logged = true;
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff.next_delay()) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// One connection: follow Sync and renew the node SVID when due.
    async fn session(&mut self, backoff: &mut Backoff) -> Result<(), ClientError> {
        let client =
            ControlPlaneClient::connect(&self.cfg.server, self.bundle_rx.clone(), self.cert_rx.clone())
                .await?;
        let mut stream = client.clone().sync(0, self.cfg.auth_addresses.clone()).await?;
        self.client_tx.send_replace(Some(client.clone()));
        info!(server = %self.cfg.server, "connected to the control plane");
        let mut state = NodeState::default();
        let mut renew_at = self.node_renew_at();
        loop {
            tokio::select! {
                msg = stream.message() => {
                    let Some(msg) = msg? else {
                        return Err(ClientError::Connect { server: self.cfg.server.clone(), reason: "sync stream ended".into() });
                    };
                    backoff.reset();
                    if state.apply(msg) {
                        if let Some(bundle) = &state.bundle
                            && bundle.sequence() != self.bundle_rx.borrow().sequence() {
                                if let Err(e) = node_svid::save_bundle(&self.cfg.data_dir, bundle) {
                                    warn!(error = %e, "cannot store the new bundle");
                                }
                                self.bundle_tx.send_replace(bundle.clone());
                            }
                        self.state_tx.send_replace(Arc::new(state.clone()));
                    }
                }
                _ = tokio::time::sleep_until(renew_at) => {
                    match client.clone().renew_node_svid().await {
                        Ok(id) => {
                            node_svid::save_svid(&self.cfg.data_dir, &id.svid).map_err(|e| ClientError::Key(e.to_string()))?;
                            let certified = id.svid.certified_key().map_err(|e| ClientError::Key(e.to_string()))?;
                            self.cert_tx.send_replace(Some(certified));
                            self.node_svid = id.svid;
                            renew_at = self.node_renew_at();
                            info!("node SVID renewed");
                        }
                        Err(e) => {
                            warn!(error = %e, "node SVID renewal failed; retrying");
                            renew_at = tokio::time::Instant::now() + backoff.next_delay();
                        }
                    }
                }
            }
        }
    }

    fn node_renew_at(&self) -> tokio::time::Instant {
        tokio::time::Instant::now()
            + renew_after(
                &self.node_svid,
                SystemTime::now(),
                keyway_identity::jitter::unit(),
            )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct SvidLabels {
    spiffe_id: String,
}

/// The agent core's metric families: the workload SVIDs held (their
/// expiry) and their renewals, and how current the view from Sync is.
/// Registered before the metrics listener binds, so `/metrics` lists them
/// while the agent is still attesting.
#[derive(Debug, Clone)]
pub struct CoreMetrics {
    expiry: Family<SvidLabels, Gauge>,
    rotated: Counter,
    sync_lag: Gauge<f64, AtomicU64>,
    last_applied: Gauge<f64, AtomicU64>,
}

impl CoreMetrics {
    pub fn register(r: &Registry) -> Self {
        Self {
            expiry: r.register(
                "keyway_svid_expiry_timestamp_seconds",
                "When each workload X509-SVID this agent holds expires (Unix seconds).",
                Family::default(),
            ),
            rotated: r.register(
                "keyway_svid_rotations",
                "Workload X509-SVIDs renewed (replaced before expiry).",
                Counter::default(),
            ),
            sync_lag: r.register(
                "keyway_sync_lag_seconds",
                "0 while the Sync stream is connected and its last complete update is applied; \
                 otherwise seconds since this agent's view was last known current (the connection \
                 loss, or start-up before the first complete snapshot).",
                Gauge::default(),
            ),
            last_applied: r.register(
                "keyway_sync_last_applied_timestamp_seconds",
                "When the last complete Sync update was applied (Unix seconds; 0 before the first).",
                Gauge::default(),
            ),
        }
    }
}

/// Fills the agent core's metrics from what it publishes (the SVIDs held
/// are read at scrape time), and decides the readiness of the node SVID
/// (held once there are handles) and of the first complete Sync.
fn watch_for_telemetry(handles: &AgentHandles, metrics: CoreMetrics, shutdown: watch::Receiver<bool>) {
    let r = &handles.telemetry.registry;
    let CoreMetrics {
        expiry,
        rotated,
        sync_lag,
        last_applied,
    } = metrics;
    let readiness = handles.telemetry.readiness.clone();
    readiness.set_ready(READY_NODE_SVID);
    let svids = handles.svids.clone();
    r.on_scrape(move || {
        let held = svids.borrow().clone();
        // Scrapes are one at a time: no scrape sees the family cleared.
        expiry.clear();
        for (id, svid) in held.iter() {
            let at = svid
                .not_after()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| gauge_value(d.as_secs()));
            expiry
                .get_or_create(&SvidLabels {
                    spiffe_id: id.clone(),
                })
                .set(at);
        }
    });
    // A rotation is a held SVID replaced by a newer one for the same ID
    // (first issuances are not rotations).
    let mut svids = handles.svids.clone();
    let mut stop = shutdown.clone();
    tokio::spawn(async move {
        let mut held = svids.borrow_and_update().clone();
        loop {
            tokio::select! {
                r = svids.changed() => if r.is_err() { return },
                _ = stop.changed() => return,
            }
            let next = svids.borrow_and_update().clone();
            let renewed = next
                .iter()
                .filter(|(id, svid)| held.get(*id).is_some_and(|old| old.serial() != svid.serial()))
                .count();
            rotated.inc_by(renewed as u64);
            held = next;
        }
    });
    let lag = Arc::new(std::sync::Mutex::new(SyncLag::new(std::time::Instant::now())));
    r.on_scrape({
        let lag = lag.clone();
        move || {
            let secs = lag.locked().seconds(std::time::Instant::now());
            sync_lag.set(secs);
        }
    });
    let mut state = handles.state.clone();
    let mut client = handles.client.clone();
    let mut shutdown = shutdown;
    tokio::spawn(async move {
        loop {
            let connected = client.borrow_and_update().is_some();
            lag.locked().connection(connected, std::time::Instant::now());
            tokio::select! {
                r = state.changed() => {
                    if r.is_err() { return; }
                    if state.borrow_and_update().synced {
                        readiness.set_ready(READY_FIRST_SYNC);
                        let now = SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map(|d| d.as_secs_f64())
                            .unwrap_or(0.0);
                        last_applied.set(now);
                        let connected = client.borrow().is_some();
                        lag.locked().applied(connected);
                    }
                }
                r = client.changed() => if r.is_err() { return },
                _ = shutdown.changed() => return,
            }
        }
    });
}

/// The sync lag's definition, sans-IO: the view is *current* while the
/// Sync stream is connected and its latest complete update was applied
/// (the control plane pushes every change, so nothing is missing); it goes
/// stale when the connection drops, and is stale from start-up until the
/// first complete snapshot. The lag is how long it has been stale.
#[derive(Debug, Clone, Copy)]
struct SyncLag {
    current: bool,
    stale_since: std::time::Instant,
}

impl SyncLag {
    fn new(start: std::time::Instant) -> Self {
        Self {
            current: false,
            stale_since: start,
        }
    }

    fn connection(&mut self, connected: bool, now: std::time::Instant) {
        if !connected && self.current {
            self.current = false;
            self.stale_since = now;
        }
    }

    fn applied(&mut self, connected: bool) {
        if connected {
            self.current = true;
        }
    }

    fn seconds(&self, now: std::time::Instant) -> f64 {
        if self.current {
            0.0
        } else {
            now.duration_since(self.stale_since).as_secs_f64()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_lag_counts_from_start_up_then_from_the_connection_loss() {
        let t0 = std::time::Instant::now();
        let s = |n: u64| t0 + Duration::from_secs(n);
        let mut l = SyncLag::new(t0);
        assert_eq!(l.seconds(s(3)), 3.0, "stale until the first snapshot");
        l.connection(true, s(3));
        assert_eq!(l.seconds(s(4)), 4.0, "connected is not enough");
        l.applied(true);
        assert_eq!(l.seconds(s(100)), 0.0, "connected and applied: current");
        l.connection(false, s(100));
        assert_eq!(l.seconds(s(130)), 30.0);
        l.connection(true, s(131));
        assert_eq!(
            l.seconds(s(132)),
            32.0,
            "reconnected, new snapshot not applied yet"
        );
        l.applied(true);
        assert_eq!(l.seconds(s(140)), 0.0);
    }
}
