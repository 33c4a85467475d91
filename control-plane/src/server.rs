//! The control plane as one value: it owns the store, the CA (published via a
//! `watch` so the TLS configs, sync streams and admin API see rotations at
//! once), the registry snapshot, and its own serving SVID.
//!
//! Every operation here is what an API call does after authentication; the
//! gRPC layers (`agent_api`, `admin`) only translate.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use keyway_identity::{SpiffeId, TrustBundle, spiffe_id};
use rustls::sign::CertifiedKey;
use tokio::sync::{Mutex, watch};
use tracing::{info, warn};

use crate::attest::{Method, NodeAttestor, Refused};
use crate::ca::{self, Authority, CaConfig, Issued, Step};
use crate::config::Config;
use crate::csr;
use crate::metrics::{IssuedKind, Metrics, Refusal, RotationStep};
use crate::registry;
use std::collections::{HashMap, HashSet};

use crate::model::{
    CaPhase, CaState, DocumentKind, DocumentRef, IssuanceRecord, JoinTokenRecord, NodeRecord, PolicyRecord,
    WorkloadRecord,
};
use crate::store::{ApplyOutcome, RegistrySnapshot, Store, StoreError};
use crate::sync::Cluster;

use crate::clock::now_unix;
use crate::error::ApiError;

/// Looks up a Node's addresses (Kubernetes mode): `None` while the Node is
/// not known (yet).
pub type NodeAddresses = Arc<dyn Fn(&str) -> Option<Vec<std::net::IpAddr>> + Send + Sync>;

/// A node SVID as returned to an agent.
#[derive(Debug, Clone)]
pub struct NodeSvid {
    pub spiffe_id: SpiffeId,
    pub issued: Issued,
    pub node: NodeRecord,
}

struct Inner {
    cfg: Config,
    ca_cfg: CaConfig,
    store: Arc<dyn Store>,
    authority: watch::Sender<Arc<Authority>>,
    bundle: watch::Sender<Arc<TrustBundle>>,
    /// Serialises CA state changes (rotation steps).
    ca_lock: Mutex<()>,
    /// The registry with its compiled policy; republished when either changes.
    registry: watch::Sender<Arc<Cluster>>,
    /// Serialises registry writes so each published snapshot is consistent.
    registry_lock: Mutex<()>,
    own_cert: watch::Sender<Option<Arc<CertifiedKey>>>,
    /// The attestor of each [`Method`] (indexed by it): join tokens from the
    /// start unless Kubernetes mode turned them off, Kubernetes tokens once
    /// Kubernetes mode enables them ([`ControlPlane::enable_attestor`]).
    attestors: [std::sync::OnceLock<Arc<dyn NodeAttestor>>; 2],
    /// Kubernetes mode: a Node's own addresses, which are the only ones its
    /// agent may advertise for mutual auth.
    node_addresses: std::sync::OnceLock<NodeAddresses>,
    /// Attestation attempts per source address.
    attest_rate: crate::rate_limit::PerSource,
    /// With replicas: whether this one leads (rotates the CA, reconciles).
    leader: std::sync::OnceLock<watch::Receiver<bool>>,
    /// Kubernetes mode: the workloads and policies the watch caches
    /// describe, held here and never stored (the API server holds them).
    /// Set when Kubernetes mode starts ([`ControlPlane::read_workloads_from_kubernetes`]).
    sourced: std::sync::OnceLock<std::sync::Mutex<Sourced>>,
    /// Sourced workloads the last publish held back (no identity yet).
    sourced_waiting: std::sync::atomic::AtomicUsize,
    /// The view's generation last published.
    sourced_published: std::sync::atomic::AtomicU64,
    /// Whether the published registry describes the cluster: always outside
    /// Kubernetes mode; in it, once the watch caches synced and the view was
    /// first published. Until then no workload is known: nothing may be
    /// judged unused, and no agent is sent a view (it would be empty).
    view_ready: watch::Sender<bool>,
    metrics: Metrics,
}

/// Kubernetes mode's view of the API server (see [`ControlPlane::apply_sourced`]).
#[derive(Debug, Default)]
struct Sourced {
    /// By namespace/name (the registry's order).
    workloads: std::collections::BTreeMap<String, SourcedWorkload>,
    /// By namespace/name: the last valid version of each policy.
    policies: std::collections::BTreeMap<String, PolicyRecord>,
    /// Grows with every change, so the published revision does too.
    generation: u64,
    /// The stored identities the workloads were last resolved against, and
    /// their numbers by [`crate::store::identity_key`]: rebuilt only when
    /// the stored identities change, not per batch.
    resolved: Option<(Vec<crate::model::IdentityRecord>, HashMap<String, u32>)>,
    /// Grows each time `resolved` is rebuilt; a workload resolved since
    /// (whose record did not change) keeps its identity without a lookup.
    resolution: u64,
}

/// A workload of Kubernetes mode's view. The record is shared with the
/// published registry (a publish copies a pointer, not the record); its
/// `identity` is filled from the store at publish.
#[derive(Debug)]
struct SourcedWorkload {
    record: Arc<WorkloadRecord>,
    /// [`crate::store::identity_key`] of the record, computed once.
    identity_key: String,
    /// The [`Sourced::resolution`] `record.identity` was set at (0: never).
    resolved_at: u64,
}

impl SourcedWorkload {
    fn new(w: WorkloadRecord) -> Self {
        let identity_key = crate::store::identity_key(&w.namespace, &w.service_account, &w.labels);
        Self {
            record: Arc::new(WorkloadRecord { identity: 0, ..w }),
            identity_key,
            resolved_at: 0,
        }
    }
}

/// Changes to Kubernetes mode's view: per namespace/name, the record now
/// (`None`: gone).
#[derive(Debug, Default)]
pub struct SourcedChanges {
    pub workloads: Vec<(String, Option<WorkloadRecord>)>,
    pub policies: Vec<(String, Option<PolicyRecord>)>,
}

impl SourcedChanges {
    pub fn is_empty(&self) -> bool {
        self.workloads.is_empty() && self.policies.is_empty()
    }
}

/// What [`ControlPlane::apply_sourced`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SourcedOutcome {
    /// Records that differed from what was held.
    pub changed: usize,
    /// Identities this call allocated in the store (leader only).
    pub allocated: usize,
    /// Workloads held back because their identity is not allocated yet
    /// (a replica that does not lead waits for the leader to allocate).
    pub waiting: usize,
}

/// The running control plane. Cheap to clone.
#[derive(Clone)]
pub struct ControlPlane {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("trust_domain", &self.inner.cfg.trust_domain.to_string())
            .finish_non_exhaustive()
    }
}

impl ControlPlane {
    /// Loads the CA from the store (creating it on first start), the
    /// registry, and issues the control plane's own serving SVID.
    pub async fn open(cfg: Config, ca_cfg: CaConfig, store: Arc<dyn Store>) -> Result<Self, ApiError> {
        Self::open_with_metrics(cfg, ca_cfg, store, Metrics::default()).await
    }

    /// Like [`ControlPlane::open`], recording into `metrics` (the registry
    /// the `/metrics` listener serves). Reports the CA ready once loaded.
    pub async fn open_with_metrics(
        cfg: Config,
        ca_cfg: CaConfig,
        store: Arc<dyn Store>,
        metrics: Metrics,
    ) -> Result<Self, ApiError> {
        let state = match store.load_ca().await? {
            Some(state) => {
                info!(
                    authorities = state.authorities.len(),
                    sequence = state.bundle_sequence,
                    "loaded CA"
                );
                state
            }
            None => {
                let state = ca::initial_state(&ca_cfg, now_unix())?;
                match store.save_ca(&state).await {
                    Ok(()) => {
                        info!(trust_domain = %cfg.trust_domain, upstream = ca_cfg.upstream.is_some(), "created CA");
                        state
                    }
                    // Replicas starting together on an empty shared store:
                    // another one created the CA first; use theirs.
                    Err(e) => match store.load_ca().await? {
                        Some(theirs) => {
                            info!("another replica created the CA first; using it");
                            theirs
                        }
                        None => return Err(e.into()),
                    },
                }
            }
        };
        let authority = Arc::new(Authority::new(
            cfg.trust_domain.clone(),
            state,
            ca_cfg.max_svid_ttl(),
        )?);
        let mut stored = store.registry().await?;
        if cfg.kubernetes && (!stored.workloads.is_empty() || !stored.policies.is_empty()) {
            // Copies of pods and policies an earlier version stored in
            // Kubernetes mode: the API server holds them, the watch caches
            // bring them back; stored, they would keep identities in use.
            let refs = stored
                .workloads
                .iter()
                .map(|w| DocumentRef {
                    kind: DocumentKind::Workload,
                    namespace: w.namespace.clone(),
                    name: w.name.clone(),
                })
                .chain(stored.policies.iter().map(|p| DocumentRef {
                    kind: DocumentKind::KeywayNetworkPolicy,
                    namespace: p.namespace.clone(),
                    name: p.name.clone(),
                }))
                .collect();
            store.delete(refs).await?;
            info!(
                workloads = stored.workloads.len(),
                policies = stored.policies.len(),
                "dropped stored copies of pods and policies: Kubernetes mode reads them from the API server"
            );
            stored = store.registry().await?;
        }
        let registry = Arc::new(Cluster::new(stored, cfg.policy_budget));
        let cfg_attest_per_minute = cfg.attest_per_minute;
        let (bundle, _) = watch::channel(authority.bundle());
        let (authority, _) = watch::channel(authority);
        let (registry, _) = watch::channel(registry);
        let (own_cert, _) = watch::channel(None);
        let (view_ready, _) = watch::channel(!cfg.kubernetes);
        let cp = Self {
            inner: Arc::new(Inner {
                cfg,
                ca_cfg,
                store,
                authority,
                bundle,
                ca_lock: Mutex::new(()),
                registry,
                registry_lock: Mutex::new(()),
                own_cert,
                attestors: Default::default(),
                node_addresses: std::sync::OnceLock::new(),
                attest_rate: crate::rate_limit::PerSource::new(cfg_attest_per_minute),
                leader: std::sync::OnceLock::new(),
                sourced: std::sync::OnceLock::new(),
                sourced_waiting: std::sync::atomic::AtomicUsize::new(0),
                sourced_published: std::sync::atomic::AtomicU64::new(0),
                view_ready,
                metrics,
            }),
        };
        if !cp.inner.cfg.kubernetes || cp.inner.cfg.allow_join_tokens {
            cp.enable_attestor(Arc::new(crate::tokens::JoinTokens::new(cp.inner.store.clone())));
        }
        cp.renew_own_svid().await?;
        cp.collect_at_scrape();
        cp.inner.metrics.readiness.set_ready(crate::metrics::READY_CA);
        Ok(cp)
    }

    /// The metrics this control plane records into.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Gauges read from the current state at scrape time: CA expiry, the
    /// registry revision, leadership. Holds the control plane weakly.
    fn collect_at_scrape(&self) {
        let weak = Arc::downgrade(&self.inner);
        let m = self.inner.metrics.clone();
        self.inner.metrics.registry.on_scrape(move || {
            let Some(inner) = weak.upgrade() else { return };
            let cp = ControlPlane { inner };
            let authority = cp.authority();
            m.ca_expiry.retain(|_| false);
            for a in &authority.state().authorities {
                m.ca_expiry
                    .set(&[&a.id, Self::phase_name(a.phase)], a.not_after as f64);
            }
            m.registry_revision
                .set(&[], cp.inner.registry.borrow().records.revision as f64);
            m.is_leader.set(&[], if cp.is_leader() { 1.0 } else { 0.0 });
        });
    }

    pub fn config(&self) -> &Config {
        &self.inner.cfg
    }

    pub fn authority(&self) -> Arc<Authority> {
        self.inner.authority.borrow().clone()
    }

    pub fn subscribe_authority(&self) -> watch::Receiver<Arc<Authority>> {
        self.inner.authority.subscribe()
    }

    pub fn subscribe_bundle(&self) -> watch::Receiver<Arc<TrustBundle>> {
        self.inner.bundle.subscribe()
    }

    pub fn subscribe_registry(&self) -> watch::Receiver<Arc<Cluster>> {
        self.inner.registry.subscribe()
    }

    pub fn own_cert(&self) -> watch::Receiver<Option<Arc<CertifiedKey>>> {
        self.inner.own_cert.subscribe()
    }

    /// Accepts the proofs `attestor` checks for node attestation (its
    /// method's first attestor stays).
    pub fn enable_attestor(&self, attestor: Arc<dyn NodeAttestor>) {
        let _ = self.inner.attestors[attestor.method() as usize].set(attestor);
    }

    /// Checks the mutual-auth addresses agents advertise against their
    /// Node's addresses (Kubernetes mode): a node may not point its peers,
    /// and their handshakes, at an address that is not its own.
    pub fn check_node_addresses_with(&self, lookup: NodeAddresses) {
        let _ = self.inner.node_addresses.set(lookup);
    }

    /// Makes CA rotation and manual rotation steps follow this leadership
    /// (replicas sharing a store). Without it this process always leads.
    pub fn follow_leadership(&self, leader: watch::Receiver<bool>) {
        let _ = self.inner.leader.set(leader);
    }

    /// Whether this replica leads (always, when it runs alone).
    pub fn is_leader(&self) -> bool {
        self.inner.leader.get().is_none_or(|l| *l.borrow())
    }

    /// Applies changes other replicas made to a shared store (CA rotation
    /// steps, registry changes) until `shutdown`. Returns at once for a
    /// store only this process writes.
    pub async fn follow_store(&self, mut shutdown: watch::Receiver<bool>) {
        let Some(mut changes) = self.inner.store.subscribe_changes() else {
            return;
        };
        loop {
            tokio::select! {
                r = changes.changed() => if r.is_err() { return },
                _ = shutdown.changed() => return,
            }
            if let Err(e) = self.reload_shared().await {
                warn!(error = %e, "cannot load what another replica changed; retrying on the next change");
            }
        }
    }

    async fn reload_shared(&self) -> Result<(), ApiError> {
        if let Some(state) = self.inner.store.load_ca().await? {
            let _guard = self.inner.ca_lock.lock().await;
            let current = self.authority();
            if current.state().bundle_sequence != state.bundle_sequence
                || state.active().map(|a| a.id.as_str()) != Some(current.active_id())
            {
                let next = Arc::new(Authority::new(
                    self.inner.cfg.trust_domain.clone(),
                    state,
                    self.inner.ca_cfg.max_svid_ttl(),
                )?);
                let activated = next.active_id() != current.active_id();
                info!(
                    sequence = next.state().bundle_sequence,
                    "loaded a CA change made by another replica"
                );
                self.publish_authority(next);
                if activated {
                    self.renew_own_svid().await?;
                }
            }
        }
        let _guard = self.inner.registry_lock.lock().await;
        self.refresh_registry().await
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    fn publish_authority(&self, authority: Arc<Authority>) {
        self.inner.bundle.send_if_modified(|b| {
            if b.sequence() == authority.bundle().sequence() {
                return false;
            }
            *b = authority.bundle();
            true
        });
        self.inner.authority.send_replace(authority);
    }

    /// Issues (and logs) a certificate for `spiffe_id` from a CSR, with a
    /// serial number tag for node SVIDs.
    async fn issue(
        &self,
        csr_der: &[u8],
        spiffe_id: &SpiffeId,
        ttl: Duration,
        requester: &str,
        kind: IssuedKind,
        serial_tag: Option<u32>,
    ) -> Result<Issued, ApiError> {
        let started = std::time::Instant::now();
        let public_key =
            csr::check(csr_der, &spiffe_id.to_string()).map_err(|e| self.refuse(Refusal::BadCsr, e))?;
        let now = now_unix();
        let issued = self
            .authority()
            .issue(&public_key, spiffe_id, ttl, now, serial_tag)?;
        self.inner
            .store
            .log_issuance(&IssuanceRecord {
                serial: issued.serial.clone(),
                spiffe_id: spiffe_id.to_string(),
                requester: requester.to_owned(),
                ca_id: issued.ca_id.clone(),
                issued_at: now,
                not_after: issued.not_after,
            })
            .await?;
        self.inner.metrics.issued(kind, started);
        Ok(issued)
    }

    /// Counts a refusal by reason; returns the error to send back.
    fn refuse(&self, reason: Refusal, e: impl Into<ApiError>) -> ApiError {
        self.inner.metrics.refused(reason);
        e.into()
    }

    /// Counts a refusal the caller found (unauthenticated, not attested).
    pub fn count_refusal(&self, reason: Refusal) {
        self.inner.metrics.refused(reason);
    }

    /// Issues the control plane's own serving SVID and publishes it to the
    /// TLS listener.
    pub async fn renew_own_svid(&self) -> Result<SystemTime, ApiError> {
        let (key, csr_der) =
            keyway_identity::csr::generate().map_err(|e| ApiError::Internal(e.to_string()))?;
        let id = spiffe_id::control_plane_id(&self.inner.cfg.trust_domain);
        let issued = self
            .issue(
                &csr_der,
                &id,
                self.inner.cfg.node_svid_ttl,
                "control-plane",
                IssuedKind::ControlPlane,
                None,
            )
            .await?;
        let svid = keyway_identity::Svid::new(issued.chain, key.serialize_der())
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        let certified = svid
            .certified_key()
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        self.inner.own_cert.send_replace(Some(certified));
        Ok(svid.not_after())
    }

    // ---- agent API ------------------------------------------------------

    /// Node attestation: checks the node name, the CSR and the proof (with
    /// the method's [`NodeAttestor`]), then signs the node SVID and registers
    /// the node, consuming a single-use proof in the same store write.
    ///
    /// Cheapest refusal first: a join token is looked up (a hash and one
    /// read, no lock) before the CSR is checked or anything is signed, so a
    /// flood of bad tokens costs no signature checks; a Kubernetes token is
    /// reviewed (a call to the API server) only for a request whose CSR
    /// holds. In Kubernetes mode join tokens are off unless
    /// `--allow-join-tokens` turns them on: agents there attest with their
    /// projected service account token.
    pub async fn attest(
        &self,
        method: Method,
        proof: &str,
        node: &str,
        csr_der: &[u8],
    ) -> Result<NodeSvid, ApiError> {
        let started = std::time::Instant::now();
        let Some(attestor) = self.inner.attestors[method as usize].get() else {
            return Err(match method {
                Method::JoinToken => self.refuse(
                    Refusal::JoinTokensOff,
                    ApiError::FailedPrecondition(
                        "join-token attestation is off in Kubernetes mode: agents attest with their projected \
                         service account token (--k8s-token-file); start the control plane with \
                         --allow-join-tokens to accept join tokens too"
                            .into(),
                    ),
                ),
                Method::Kubernetes => self.refuse(
                    Refusal::NotKubernetes,
                    ApiError::FailedPrecondition(
                        "this control plane does not run in Kubernetes mode (--kubernetes); attest with a join token"
                            .into(),
                    ),
                ),
            });
        };
        let bad = |e: String| self.refuse(Refusal::BadRequest, ApiError::InvalidArgument(e));
        spiffe_id::check_name("node name", node).map_err(|e| bad(e.to_string()))?;
        let id = spiffe_id::node_id(&self.inner.cfg.trust_domain, node).map_err(|e| bad(e.to_string()))?;
        let refused = |r: Refused| match r.reason {
            Some(reason) => self.refuse(reason, r.error),
            None => r.error,
        };
        let checked_first = if attestor.proof_before_csr() {
            Some(attestor.verify(proof, node).await.map_err(refused)?)
        } else {
            None
        };
        let public_key = csr::check(csr_der, &id.to_string()).map_err(|e| self.refuse(Refusal::BadCsr, e))?;
        let attested = match checked_first {
            Some(attested) => attested,
            None => attestor.verify(proof, node).await.map_err(refused)?,
        };
        // Signed under the registry lock: when the node's registration
        // begins is decided with nothing able to revoke it in between.
        let _guard = self.inner.registry_lock.lock().await;
        let (now, registration, issued, record) = self.issue_node_svid(&public_key, &id, node)?;
        let store = &self.inner.store;
        let node_rec = match &attested.consumes {
            // Consuming is what makes a proof single-use: two attempts with
            // the same token both pass its check, one of them consumes.
            Some(key) => store
                .consume_join_token(key, node, now, registration, &record)
                .await
                .map_err(|e| match e {
                    StoreError::TokenRefused(_) => self.refuse(Refusal::TokenRefused, e),
                    other => other.into(),
                })?,
            None => store.register_node(node, now, registration, &record).await?,
        };
        self.refresh_registry().await?;
        self.inner.metrics.issued(IssuedKind::Node, started);
        match &attested.pod {
            Some(pod) => info!(
                node,
                node_id = node_rec.node_id,
                pod = %pod,
                "node attested with a {}",
                method.describe()
            ),
            None => info!(
                node,
                node_id = node_rec.node_id,
                "node attested with a {}",
                method.describe()
            ),
        }
        Ok(NodeSvid {
            spiffe_id: id,
            issued,
            node: node_rec,
        })
    }

    /// Whether an attestation attempt from `source` is within its rate
    /// (counted and refused otherwise). Attestation is the one call that
    /// needs no certificate, so it is the cheapest to flood.
    pub fn attest_admitted(&self, source: std::net::IpAddr) -> bool {
        if self.inner.attest_rate.admit(source) {
            return true;
        }
        self.inner.metrics.refused(Refusal::RateLimited);
        false
    }

    /// Signs a node SVID for an attested node and the issuance record the
    /// store writes with the node's registration (one atomic step).
    ///
    /// The SVID's serial number carries the node's registration tag: the
    /// current one, or a fresh random one when this attestation begins a new
    /// registration (the node unknown, or revoked), returned for the store
    /// to record. So no SVID of an earlier, revoked registration ever passes
    /// [`ControlPlane::authenticate_node`] again. Call with the registry
    /// lock held, so the registration cannot change in between.
    fn issue_node_svid(
        &self,
        public_key: &rcgen::SubjectPublicKeyInfo,
        id: &SpiffeId,
        node: &str,
    ) -> Result<(i64, u32, Issued, IssuanceRecord), ApiError> {
        let registration = match self.node(node) {
            Some(rec) => rec.registration,
            None => crate::tokens::random_u32().map_err(|_| ApiError::Internal("no randomness".into()))?,
        };
        let now = now_unix();
        let issued = self.authority().issue(
            public_key,
            id,
            self.inner.cfg.node_svid_ttl,
            now,
            Some(registration),
        )?;
        let record = IssuanceRecord {
            serial: issued.serial.clone(),
            spiffe_id: id.to_string(),
            requester: node.to_owned(),
            ca_id: issued.ca_id.clone(),
            issued_at: now,
            not_after: issued.not_after,
        };
        Ok((now, registration, issued, record))
    }

    /// Forgets the numeric identities no workload has used for `grace`
    /// (leader only; others return 0). `unused` remembers since when each
    /// was seen unused; it lives with the caller's loop, so a restart only
    /// delays collection. Returns how many were forgotten.
    pub async fn collect_unused_identities(
        &self,
        unused: &mut HashMap<u32, tokio::time::Instant>,
        grace: Duration,
    ) -> Result<usize, ApiError> {
        if !self.is_leader() || !*self.inner.view_ready.borrow() {
            // A replica whose watch caches have not synced knows no pod:
            // every identity would look unused.
            unused.clear();
            return Ok(0);
        }
        let now = tokio::time::Instant::now();
        // Under the registry lock, so no workload starts using an identity
        // between this look and its collection.
        let _guard = self.inner.registry_lock.lock().await;
        let cluster = self.registry();
        let used: HashSet<u32> = cluster.records.workloads.iter().map(|w| w.identity).collect();
        let idle: HashSet<u32> = cluster
            .records
            .identities
            .iter()
            .map(|i| i.id)
            .filter(|id| !used.contains(id))
            .collect();
        unused.retain(|id, _| idle.contains(id));
        for id in &idle {
            unused.entry(*id).or_insert(now);
        }
        let due: Vec<u32> = unused
            .iter()
            .filter(|(_, since)| now.duration_since(**since) >= grace)
            .map(|(id, _)| *id)
            .collect();
        if due.is_empty() {
            return Ok(0);
        }
        let n = self.inner.store.forget_identities(&due).await?;
        for id in &due {
            unused.remove(id);
        }
        if n > 0 {
            info!(forgotten = n, "unused numeric identities collected");
            self.refresh_registry().await?;
        }
        Ok(n)
    }

    /// Prunes the issuance log to `--issuance-*` (leader only; others
    /// return `None`), and records what it holds in the metrics.
    pub async fn prune_issuance_log(&self) -> Result<Option<crate::store::PruneOutcome>, ApiError> {
        if !self.is_leader() {
            return Ok(None);
        }
        let keep = self.inner.cfg.issuance_retention;
        let out = self.inner.store.prune_issuance(&keep, now_unix()).await?;
        self.inner.metrics.issuance_log(&out);
        if out.removed > 0 {
            info!(
                removed = out.removed,
                kept = out.kept,
                kept_bytes = out.kept_bytes,
                "issuance log pruned"
            );
        }
        if out.unreadable > 0 {
            warn!(
                unreadable = out.unreadable,
                "issuance records that cannot be read are kept; see the store"
            );
        }
        Ok(Some(out))
    }

    /// Prunes the issuance log until `shutdown`: soon after start, then a
    /// few times per retention margin (at most every five minutes).
    pub async fn run_issuance_retention(&self, mut shutdown: watch::Receiver<bool>) {
        let margin = self.inner.cfg.issuance_retention.after_expiry;
        // Each prune reads the whole log: not more often than every 10 s.
        let every = (margin / 4).clamp(Duration::from_secs(10), Duration::from_secs(300));
        let mut wait = every.min(Duration::from_secs(30));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return,
            }
            wait = every;
            if let Err(e) = self.prune_issuance_log().await {
                warn!(error = %e, "pruning the issuance log failed; retrying later");
            }
        }
    }

    /// Collects unused identities until `shutdown`, a few times per grace
    /// period (at most every five minutes).
    pub async fn run_identity_gc(&self, mut shutdown: watch::Receiver<bool>) {
        let grace = self.inner.cfg.identity_gc_grace;
        let every = (grace / 4).clamp(Duration::from_secs(1), Duration::from_secs(300));
        let mut unused = HashMap::new();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.changed() => return,
            }
            if let Err(e) = self.collect_unused_identities(&mut unused, grace).await {
                warn!(error = %e, "collecting unused identities failed; retrying later");
            }
        }
    }

    /// Revokes a node: its record is deleted, so its SVID is refused from now
    /// on (renewal included), its Sync stream ends, and every agent drops it
    /// from the node table and flushes the auth entries it vouched for. A
    /// new attestation starts a new registration; SVIDs from before the
    /// revocation stay refused (see [`NodeRecord::registration`]).
    pub async fn revoke_node(&self, node: &str) -> Result<bool, ApiError> {
        let _guard = self.inner.registry_lock.lock().await;
        let revoked = self.inner.store.revoke_node(node).await?;
        if revoked {
            warn!(node, "node revoked");
            self.refresh_registry().await?;
        }
        Ok(revoked)
    }

    /// The registered node behind a node SVID: refused when the node is not
    /// registered (never attested, or revoked) or the certificate predates
    /// its current registration (a key from before a revocation).
    pub fn authenticate_node(
        &self,
        node: &str,
        cert_serial_tag: Option<u32>,
    ) -> Result<NodeRecord, ApiError> {
        let Some(record) = self.node(node) else {
            self.inner.metrics.refused(Refusal::NotAttested);
            return Err(ApiError::PermissionDenied(format!(
                "node {node} is not attested with this control plane (never attested, or revoked); attest again"
            )));
        };
        if record.registration != 0 && cert_serial_tag != Some(record.registration) {
            self.inner.metrics.refused(Refusal::Revoked);
            return Err(ApiError::PermissionDenied(format!(
                "this node SVID for {node} was issued before the node's current registration (it was revoked \
                 since); attest again"
            )));
        }
        Ok(record)
    }

    /// The attested node record for `node`, if any.
    pub fn node(&self, node: &str) -> Option<NodeRecord> {
        self.inner
            .registry
            .borrow()
            .records
            .nodes
            .iter()
            .find(|n| n.name == node)
            .cloned()
    }

    /// Records where `node`'s agent takes mutual-auth handshakes (what it
    /// sent when opening Sync), so every node's node table carries them. The
    /// addresses are checked first: one bad value refuses them all and
    /// stores nothing. A write happens only when they changed.
    pub async fn set_node_addresses(&self, node: &str, addresses: &[String]) -> Result<(), ApiError> {
        let addresses = check_auth_addresses(addresses)
            .map_err(|e| self.refuse(Refusal::BadAddresses, ApiError::InvalidArgument(e)))?;
        if let Some(lookup) = self.inner.node_addresses.get() {
            let Some(own) = lookup(node) else {
                return Err(ApiError::Unavailable(format!(
                    "Node {node} is not in this control plane's cache yet; retry shortly"
                )));
            };
            for (i, a) in addresses.iter().enumerate() {
                let ip = a.parse::<std::net::SocketAddr>().map(|s| s.ip()).ok();
                if !ip.is_some_and(|ip| own.contains(&ip)) {
                    return Err(self.refuse(
                        Refusal::BadAddresses,
                        ApiError::InvalidArgument(format!(
                            "auth_addresses[{i}]: {a} is not an address of Node {node} (its addresses: {}); \
                             advertise one of the Node's own addresses (--auth-address)",
                            own.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
                        )),
                    ));
                }
            }
        }
        let current = self.node(node).ok_or_else(|| {
            self.refuse(
                Refusal::NotAttested,
                ApiError::PermissionDenied(format!("node {node} is not attested")),
            )
        })?;
        if current.addresses == addresses {
            return Ok(());
        }
        let _guard = self.inner.registry_lock.lock().await;
        match self
            .inner
            .store
            .set_node_addresses(node, addresses.clone())
            .await?
        {
            None => {
                return Err(ApiError::PermissionDenied(format!("node {node} is not attested")));
            }
            Some(false) => {}
            Some(true) => {
                info!(node, addresses = ?addresses, "node mutual-auth addresses changed");
                self.refresh_registry().await?;
            }
        }
        Ok(())
    }

    pub async fn renew_node_svid(&self, node: &str, csr_der: &[u8]) -> Result<NodeSvid, ApiError> {
        let node_rec = self.node(node).ok_or_else(|| {
            self.refuse(
                Refusal::NotAttested,
                ApiError::PermissionDenied(format!("node {node} is not attested")),
            )
        })?;
        let id = spiffe_id::node_id(&self.inner.cfg.trust_domain, node)
            .map_err(|e| self.refuse(Refusal::BadRequest, ApiError::InvalidArgument(e.to_string())))?;
        let issued = self
            .issue(
                csr_der,
                &id,
                self.inner.cfg.node_svid_ttl,
                node,
                IssuedKind::Node,
                Some(node_rec.registration),
            )
            .await?;
        Ok(NodeSvid {
            spiffe_id: id,
            issued,
            node: node_rec,
        })
    }

    /// The SVID TTL for `requested` on `node`, or why the node may not have it:
    /// nodes get SVIDs only for identities with a Workload placed on them.
    fn authorize_workload(&self, node: &str, requested: &str) -> Result<(SpiffeId, Duration), ApiError> {
        let id = spiffe_id::parse_svid_id_in(requested, &self.inner.cfg.trust_domain)
            .map_err(|e| self.refuse(Refusal::BadRequest, ApiError::InvalidArgument(e.to_string())))?;
        let reg = self.inner.registry.borrow();
        let with_id: Vec<_> = reg.workloads_with(requested).collect();
        let here: Vec<_> = with_id.iter().filter(|w| w.node == node).collect();
        if here.is_empty() {
            let elsewhere: std::collections::BTreeSet<&str> =
                with_id.iter().map(|w| w.node.as_str()).collect();
            self.inner.metrics.refused(Refusal::NotPlaced);
            return Err(ApiError::PermissionDenied(if elsewhere.is_empty() {
                format!(
                    "no workload with identity {requested} exists; nodes get SVIDs only for workloads placed on them"
                )
            } else {
                format!(
                    "node {node} has no workload with identity {requested} (it runs on: {}); nodes get SVIDs only for workloads placed on them",
                    elsewhere.into_iter().collect::<Vec<_>>().join(", ")
                )
            }));
        }
        let ttl = here
            .iter()
            .filter_map(|w| w.svid_ttl_secs)
            .min()
            .map(Duration::from_secs)
            .unwrap_or(self.inner.cfg.svid_ttl);
        Ok((id, ttl))
    }

    /// Signs a workload CSR for `node`, only for an identity with a Workload
    /// placed on that node.
    pub async fn sign_workload_csr(
        &self,
        node: &str,
        requested: &str,
        csr_der: &[u8],
    ) -> Result<(SpiffeId, Issued), ApiError> {
        let (id, ttl) = self.authorize_workload(node, requested)?;
        let issued = self
            .issue(csr_der, &id, ttl, node, IssuedKind::Workload, None)
            .await?;
        Ok((id, issued))
    }

    /// Mints a JWT-SVID for a workload identity placed on `node`.
    pub fn mint_workload_jwt(
        &self,
        node: &str,
        requested: &str,
        audience: &[String],
    ) -> Result<(String, i64), ApiError> {
        self.authorize_workload(node, requested)?;
        self.mint_jwt(requested, audience, self.inner.cfg.jwt_ttl)
    }

    // ---- admin API ------------------------------------------------------

    pub async fn create_join_token(&self, node: &str, ttl: Duration) -> Result<(String, i64), ApiError> {
        spiffe_id::check_name("node name", node).map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
        let token = crate::tokens::generate().map_err(|_| ApiError::Internal("no randomness".into()))?;
        let now = now_unix();
        let expires_at = now + ttl.as_secs() as i64;
        self.inner
            .store
            .put_join_token(
                &crate::tokens::hash(&token),
                &JoinTokenRecord {
                    node: node.to_owned(),
                    created_at: now,
                    expires_at,
                    consumed_at: None,
                },
            )
            .await?;
        info!(node, expires_at, "join token created");
        Ok((token, expires_at))
    }

    /// Mints an X509-SVID for any ID in the trust domain (admin only).
    pub async fn mint_x509(
        &self,
        requested: &str,
        csr_der: &[u8],
        ttl: Duration,
    ) -> Result<Issued, ApiError> {
        let id = spiffe_id::parse_svid_id_in(requested, &self.inner.cfg.trust_domain)
            .map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
        self.issue(csr_der, &id, ttl, "admin", IssuedKind::Admin, None)
            .await
    }

    pub fn mint_jwt(
        &self,
        requested: &str,
        audience: &[String],
        ttl: Duration,
    ) -> Result<(String, i64), ApiError> {
        let id = spiffe_id::parse_svid_id_in(requested, &self.inner.cfg.trust_domain)
            .map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
        if audience.is_empty() || audience.iter().any(|a| a.is_empty()) {
            return Err(ApiError::InvalidArgument(
                "at least one non-empty audience is required (rule JWT-06)".into(),
            ));
        }
        Ok(self.authority().mint_jwt(&id, audience, ttl, now_unix())?)
    }

    /// Runs one rotation step now (manual `ca prepare` / `ca activate`, or
    /// the scheduler).
    pub async fn rotate(&self, step: Step) -> Result<Arc<Authority>, ApiError> {
        if !self.is_leader() {
            return Err(ApiError::FailedPrecondition(
                "this replica is not the leader; CA rotation steps run on the leader (see the Lease's holderIdentity)".into(),
            ));
        }
        let _guard = self.inner.ca_lock.lock().await;
        let current = self.authority();
        let next_state: CaState = ca::apply_step(&self.inner.ca_cfg, current.state(), &step, now_unix())?;
        let next = Arc::new(Authority::new(
            self.inner.cfg.trust_domain.clone(),
            next_state,
            self.inner.ca_cfg.max_svid_ttl(),
        )?);
        self.inner.store.save_ca(next.state()).await?;
        self.inner.metrics.rotated(match step {
            Step::Prepare => RotationStep::Prepare,
            Step::Activate => RotationStep::Activate,
            Step::Retire(_) => RotationStep::Retire,
        });
        info!(
            ?step,
            sequence = next.state().bundle_sequence,
            active = next.active_id(),
            "CA rotation step"
        );
        self.publish_authority(next.clone());
        if step == Step::Activate {
            // Serve with an SVID from the new CA from now on.
            self.renew_own_svid().await?;
        }
        Ok(next)
    }

    /// Drives automatic rotation and renews the serving SVID until `shutdown`.
    pub async fn run_schedule(&self, mut shutdown: watch::Receiver<bool>) {
        let mut own_renew_at = tokio::time::Instant::now() + self.inner.cfg.node_svid_ttl / 2;
        loop {
            let now = now_unix();
            let next = ca::next_step(self.authority().state(), self.inner.ca_cfg.max_svid_ttl());
            let wait_ca = next
                .as_ref()
                .map(|(_, due)| Duration::from_secs((*due - now).max(0) as u64))
                .unwrap_or(Duration::from_secs(3600));
            // Wall-clock schedules are re-evaluated at least every minute so
            // a clock jump is noticed.
            let wait_ca = wait_ca.min(Duration::from_secs(60));
            tokio::select! {
                _ = tokio::time::sleep(wait_ca) => {
                    if self.is_leader()
                        && let Some((step, due)) = ca::next_step(self.authority().state(), self.inner.ca_cfg.max_svid_ttl())
                        && due <= now_unix()
                            && let Err(e) = self.rotate(step.clone()).await {
                                warn!(?step, error = %e, "scheduled CA rotation step failed; retrying in a minute");
                                tokio::time::sleep(Duration::from_secs(60).min(self.inner.ca_cfg.ca_ttl / 12)).await;
                            }
                }
                _ = tokio::time::sleep_until(own_renew_at) => {
                    match self.renew_own_svid().await {
                        Ok(_) => own_renew_at = tokio::time::Instant::now() + self.inner.cfg.node_svid_ttl / 2,
                        Err(e) => {
                            warn!(error = %e, "renewing the control plane's SVID failed; retrying");
                            own_renew_at = tokio::time::Instant::now() + Duration::from_secs(10);
                        }
                    }
                }
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Applies Workload and KeywayNetworkPolicy documents: all of them, or
    /// none when any is invalid.
    pub async fn apply(&self, yaml: &str) -> Result<ApplyOutcome, ApiError> {
        self.refuse_in_kubernetes_mode()?;
        let docs = registry::parse_documents(
            yaml,
            &self.inner.cfg.trust_domain,
            self.inner.ca_cfg.max_svid_ttl(),
        )
        .map_err(ApiError::InvalidArgument)?;
        let _guard = self.inner.registry_lock.lock().await;
        self.check_policy_budgets(&docs.workloads, &docs.policies)?;
        let outcome = self.inner.store.apply(docs.workloads, docs.policies).await?;
        self.refresh_registry().await?;
        Ok(outcome)
    }

    /// Refuses an apply that would leave a policy over its entry budget
    /// (one it brings, or one already stored that its workloads would
    /// enlarge), naming the policy and the figures; nothing is stored then.
    fn check_policy_budgets(
        &self,
        workloads: &[WorkloadRecord],
        policies: &[PolicyRecord],
    ) -> Result<(), ApiError> {
        use crate::model::IdentityRecord;
        use crate::store::{identity_key, identity_labels};
        let current = self.registry();
        let records = &current.records;
        let applied: HashSet<String> = workloads.iter().map(WorkloadRecord::key).collect();
        let mut by_key: HashMap<String, IdentityRecord> = records
            .identities
            .iter()
            .map(|i| {
                (
                    identity_key(&i.namespace, &i.service_account, &i.labels),
                    i.clone(),
                )
            })
            .collect();
        let mut used: HashSet<u32> = records
            .workloads
            .iter()
            .filter(|w| !applied.contains(&w.key()))
            .map(|w| w.identity)
            .collect();
        // New identities get stand-in numbers above any real one.
        let mut next = u32::MAX;
        for w in workloads {
            let labels = identity_labels(&w.labels);
            let key = identity_key(&w.namespace, &w.service_account, &labels);
            let id = by_key
                .entry(key)
                .or_insert_with(|| {
                    next -= 1;
                    IdentityRecord {
                        id: next,
                        spiffe_id: w.spiffe_id.clone(),
                        namespace: w.namespace.clone(),
                        service_account: w.service_account.clone(),
                        labels,
                    }
                })
                .id;
            used.insert(id);
        }
        let identities: Vec<IdentityRecord> = by_key.into_values().filter(|i| used.contains(&i.id)).collect();
        let incoming: HashSet<String> = policies.iter().map(PolicyRecord::key).collect();
        let mut all: Vec<PolicyRecord> = records
            .policies
            .iter()
            .filter(|p| !incoming.contains(&p.key()))
            .cloned()
            .collect();
        all.extend(policies.iter().cloned());
        let refused = crate::policy::refusals(&identities, &all, self.inner.cfg.policy_budget);
        let new: Vec<String> = refused
            .iter()
            .filter(|(k, _)| !current.policy.refused.contains_key(*k))
            .map(|(k, why)| format!("KeywayNetworkPolicy {k}: {why}"))
            .collect();
        if new.is_empty() {
            Ok(())
        } else {
            Err(ApiError::InvalidArgument(format!(
                "refused, nothing applied: {}",
                new.join("; ")
            )))
        }
    }

    /// Deletes the Workload and KeywayNetworkPolicy documents a YAML file
    /// names (by kind, namespace and name), all or nothing. Their numeric
    /// identities stay allocated, so the same workload applied again gets
    /// the same one; agents stop receiving an identity once no workload uses
    /// it.
    pub async fn delete(&self, yaml: &str) -> Result<ApplyOutcome, ApiError> {
        self.refuse_in_kubernetes_mode()?;
        let refs = registry::parse_refs(yaml).map_err(ApiError::InvalidArgument)?;
        let _guard = self.inner.registry_lock.lock().await;
        let outcome = self.inner.store.delete(refs).await?;
        self.refresh_registry().await?;
        Ok(outcome)
    }

    fn refuse_in_kubernetes_mode(&self) -> Result<(), ApiError> {
        if self.inner.cfg.kubernetes {
            return Err(ApiError::FailedPrecondition(
                "this control plane runs in Kubernetes mode: workloads come from Pods and policies from \
                 KeywayNetworkPolicy/NetworkPolicy objects; use kubectl apply"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Kubernetes mode: takes what changed in the watch caches (pods as
    /// workloads, policies) into the view the registry is built from, and
    /// publishes. Nothing is stored but numeric identities: the leader
    /// allocates one for each new (namespace, service account, labels), in
    /// one store call per batch; a replica that does not lead holds such
    /// workloads back until the leader's allocation reaches its store.
    /// A workload whose identity exists costs no store write.
    pub async fn apply_sourced(&self, changes: SourcedChanges) -> Result<SourcedOutcome, ApiError> {
        let Some(sourced) = self.inner.sourced.get() else {
            return Err(ApiError::FailedPrecondition(
                "only Kubernetes mode reads workloads from the API server".into(),
            ));
        };
        let _guard = self.inner.registry_lock.lock().await;
        let mut out = SourcedOutcome::default();
        let generation;
        {
            let mut view = sourced.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            for (key, mut record) in changes.workloads {
                // The identity is the view's (the watch caches do not know it).
                let same = match (view.workloads.get(&key), record.as_mut()) {
                    (Some(held), Some(new)) => {
                        new.identity = held.record.identity;
                        *held.record == *new
                    }
                    (None, None) => true,
                    _ => false,
                };
                if same {
                    continue;
                }
                out.changed += 1;
                match record {
                    Some(w) => {
                        view.workloads.insert(key, SourcedWorkload::new(w));
                    }
                    None => {
                        view.workloads.remove(&key);
                    }
                }
            }
            for (key, record) in changes.policies {
                if view.policies.get(&key) == record.as_ref() {
                    continue;
                }
                out.changed += 1;
                match record {
                    Some(p) => view.policies.insert(key, p),
                    None => view.policies.remove(&key),
                };
            }
            if out.changed > 0 {
                view.generation += 1;
            }
            generation = view.generation;
        }
        let leader = self.is_leader();
        let waiting = self
            .inner
            .sourced_waiting
            .load(std::sync::atomic::Ordering::Relaxed);
        let published = self
            .inner
            .sourced_published
            .load(std::sync::atomic::Ordering::Relaxed);
        // Nothing new: the view was published as it is (a batch retried
        // after a store error was taken into the view, not published), and
        // no workload waits for an identity this replica now allocates (it
        // just took the lead).
        if out.changed == 0 && published == generation && !(leader && waiting > 0) {
            return Ok(out);
        }
        let stored = self.inner.store.registry().await?;
        let previous = self.registry();
        let (mut records, mut unresolved) =
            merge_sourced(self.inner.sourced.get(), stored, &previous.records.workloads);
        if leader && !unresolved.is_empty() {
            let wanted: Vec<crate::model::IdentityRecord> = unresolved
                .iter()
                .map(|w| crate::model::IdentityRecord {
                    id: 0,
                    spiffe_id: w.spiffe_id.clone(),
                    namespace: w.namespace.clone(),
                    service_account: w.service_account.clone(),
                    labels: crate::store::identity_labels(&w.labels),
                })
                .collect();
            let before = records.identities.len();
            self.inner.store.allocate_identities(&wanted).await?;
            let stored = self.inner.store.registry().await?;
            out.allocated = stored.identities.len().saturating_sub(before);
            (records, unresolved) =
                merge_sourced(self.inner.sourced.get(), stored, &previous.records.workloads);
        }
        out.waiting = unresolved.len();
        self.inner
            .sourced_waiting
            .store(out.waiting, std::sync::atomic::Ordering::Relaxed);
        self.publish_registry(records);
        self.inner
            .sourced_published
            .store(generation, std::sync::atomic::Ordering::Relaxed);
        Ok(out)
    }

    /// From now on workloads and policies are what Kubernetes mode's
    /// watchers report ([`ControlPlane::apply_sourced`]), not stored ones.
    pub fn read_workloads_from_kubernetes(&self) {
        let _ = self.inner.sourced.set(std::sync::Mutex::new(Sourced::default()));
        self.inner.view_ready.send_replace(false);
    }

    /// Kubernetes mode: the watch caches synced and the view was published
    /// once; identity collection may judge what is unused from now on.
    pub fn sourced_synced(&self) {
        self.inner.view_ready.send_replace(true);
    }

    /// Returns once the published registry describes the cluster (at once
    /// outside Kubernetes mode; in it, after the first publish from synced
    /// watch caches). A Sync stream waits for this before its snapshot: a
    /// restarted control plane would otherwise send every agent a complete
    /// view with no workloads, and each agent would withdraw its pods'
    /// entries until the caches synced.
    pub async fn view_ready(&self) {
        let mut ready = self.inner.view_ready.subscribe();
        // The sender lives as long as `self`: this cannot fail.
        let _ = ready.wait_for(|r| *r).await;
    }

    /// How many workloads Kubernetes mode's view holds (0 otherwise).
    pub fn sourced_len(&self) -> usize {
        self.inner.sourced.get().map_or(0, |s| {
            s.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .workloads
                .len()
        })
    }

    /// Kubernetes mode: the keys (namespace/name) of the workloads and
    /// policies in the view.
    pub fn sourced_keys(&self) -> (Vec<String>, Vec<String>) {
        self.inner.sourced.get().map_or_else(Default::default, |s| {
            let view = s.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            (
                view.workloads.keys().cloned().collect(),
                view.policies.keys().cloned().collect(),
            )
        })
    }

    /// Publishes the stored registry, compiling policy only when the records
    /// changed.
    async fn refresh_registry(&self) -> Result<(), ApiError> {
        let stored = self.inner.store.registry().await?;
        let previous = self.registry();
        let (mut records, unresolved) =
            merge_sourced(self.inner.sourced.get(), stored, &previous.records.workloads);
        if self.inner.sourced.get().is_none() {
            // Read back from the store, every record is a new copy.
            crate::sync::share_unchanged(&previous.records.workloads, &mut records.workloads);
        }
        self.inner
            .sourced_waiting
            .store(unresolved.len(), std::sync::atomic::Ordering::Relaxed);
        self.publish_registry(records);
        Ok(())
    }

    fn publish_registry(&self, records: RegistrySnapshot) {
        if self.inner.registry.borrow().records == records {
            return;
        }
        let previous = self.inner.registry.borrow().clone();
        let cluster = Arc::new(previous.next(records, self.inner.cfg.policy_budget));
        let before = previous.policy.refused.clone();
        for (policy, why) in cluster
            .policy
            .refused
            .iter()
            .filter(|(k, _)| !before.contains_key(*k))
        {
            warn!(%policy, reason = %why, "policy over its entry budget: not compiled, its endpoints default-deny");
        }
        info!(
            revision = cluster.records.revision,
            policies = cluster.records.policies.len(),
            policy_entries = cluster.policy.len(),
            "registry changed"
        );
        self.inner.registry.send_replace(cluster);
    }

    pub fn registry(&self) -> Arc<Cluster> {
        self.inner.registry.borrow().clone()
    }

    /// Phase names as `ca status` prints them.
    pub fn phase_name(phase: CaPhase) -> &'static str {
        match phase {
            CaPhase::Prepared => "prepared",
            CaPhase::Active => "active",
            CaPhase::Old => "old",
        }
    }
}

/// The registry the control plane serves: the stored one, and in Kubernetes
/// mode the workloads and policies of the watch caches, each workload with
/// the identity the store allocated for it. Workloads with no identity yet
/// are returned apart, and held meanwhile as `previous` (the published
/// workloads) had them: a pod relabelled on a replica that does not lead
/// keeps its old identity (labels and number, its new addresses and node)
/// until the leader's allocation reaches this replica, as a Cilium endpoint
/// keeps its identity until the new one is allocated, instead of vanishing
/// from its node. A workload not published before waits unseen.
fn merge_sourced(
    sourced: Option<&std::sync::Mutex<Sourced>>,
    mut stored: RegistrySnapshot,
    previous: &[Arc<WorkloadRecord>],
) -> (RegistrySnapshot, Vec<WorkloadRecord>) {
    let Some(sourced) = sourced else {
        return (stored, Vec::new());
    };
    let mut guard = sourced.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let view = &mut *guard;
    if !view
        .resolved
        .as_ref()
        .is_some_and(|(from, _)| *from == stored.identities)
    {
        // An identity two replicas allocated at once has two numbers: the
        // lowest is used, and the other, unused, is collected.
        let mut by_key: HashMap<String, u32> = HashMap::with_capacity(stored.identities.len());
        for i in &stored.identities {
            let key = crate::store::identity_key(&i.namespace, &i.service_account, &i.labels);
            by_key
                .entry(key)
                .and_modify(|id| *id = (*id).min(i.id))
                .or_insert(i.id);
        }
        view.resolved = Some((stored.identities.clone(), by_key));
        view.resolution += 1;
    }
    let by_key = &view.resolved.as_ref().expect("just set").1;
    // Each record is shared with the view: only a record whose identity
    // changed is copied (once; a new one is not shared yet). A record
    // resolved against these identities before is not looked up again.
    let mut workloads = Vec::with_capacity(view.workloads.len());
    let mut unresolved = Vec::new();
    for w in view.workloads.values_mut() {
        if w.resolved_at == view.resolution {
            workloads.push(Arc::clone(&w.record));
            continue;
        }
        match by_key.get(&w.identity_key) {
            Some(id) => {
                if w.record.identity != *id {
                    Arc::make_mut(&mut w.record).identity = *id;
                }
                w.resolved_at = view.resolution;
                workloads.push(Arc::clone(&w.record));
            }
            None => {
                let r = &w.record;
                // `previous` is in the same (namespace/name) order.
                if let Ok(i) = previous.binary_search_by(|p| {
                    crate::store::key_order(&p.namespace, &p.name, &r.namespace, &r.name)
                }) {
                    workloads.push(Arc::new(WorkloadRecord {
                        node: r.node.clone(),
                        ips: r.ips.clone(),
                        ..(*previous[i]).clone()
                    }));
                }
                unresolved.push((**r).clone());
            }
        }
    }
    // In key order already (a BTreeMap by namespace/name).
    stored.workloads = workloads;
    stored.policies = view.policies.values().cloned().collect();
    stored.revision += view.generation;
    (stored, unresolved)
}

/// How many mutual-auth addresses one node may advertise.
pub const MAX_AUTH_ADDRESSES: usize = 16;

/// Checks the mutual-auth addresses an agent advertises and returns them in
/// canonical form (`IP:PORT`, `[IPv6]:PORT`), duplicates dropped, order kept.
/// Each must be dialable by a peer: a specific IP and a non-zero port.
pub fn check_auth_addresses(raw: &[String]) -> Result<Vec<String>, String> {
    if raw.len() > MAX_AUTH_ADDRESSES {
        return Err(format!(
            "auth_addresses: {} addresses given; at most {MAX_AUTH_ADDRESSES} are accepted",
            raw.len()
        ));
    }
    let mut out: Vec<String> = Vec::with_capacity(raw.len());
    for (i, a) in raw.iter().enumerate() {
        let addr: std::net::SocketAddr = a.parse().map_err(|_| {
            format!("auth_addresses[{i}]: {a:?} is not IP:PORT (e.g. 10.0.0.5:4250 or [fd00::5]:4250)")
        })?;
        if addr.ip().is_unspecified() || addr.ip().is_multicast() {
            return Err(format!(
                "auth_addresses[{i}]: {a:?} cannot be dialled by peers; advertise the node's own IP"
            ));
        }
        if addr.port() == 0 {
            return Err(format!(
                "auth_addresses[{i}]: {a:?} has port 0; advertise the port the agent listens on"
            ));
        }
        let canonical = addr.to_string();
        if !out.contains(&canonical) {
            out.push(canonical);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(list: &[&str]) -> Result<Vec<String>, String> {
        check_auth_addresses(&list.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn auth_addresses_are_socket_addresses_peers_can_dial() {
        assert_eq!(check(&[]).unwrap(), Vec::<String>::new());
        assert_eq!(
            check(&["10.0.0.5:4250", "[FD00::5]:4250", "10.0.0.5:4250"]).unwrap(),
            vec!["10.0.0.5:4250", "[fd00::5]:4250"]
        );
        for (bad, want) in [
            ("10.0.0.5", "is not IP:PORT"),
            ("node-a:4250", "is not IP:PORT"),
            ("10.0.0.5:99999", "is not IP:PORT"),
            ("0.0.0.0:4250", "cannot be dialled"),
            ("[::]:4250", "cannot be dialled"),
            ("224.0.0.1:4250", "cannot be dialled"),
            ("10.0.0.5:0", "port 0"),
        ] {
            let e = check(&["10.0.0.1:4250", bad]).unwrap_err();
            assert!(
                e.starts_with("auth_addresses[1]: ") && e.contains(&format!("{bad:?}")) && e.contains(want),
                "{bad}: {e}"
            );
        }
        let many: Vec<String> = (1..=17).map(|i| format!("10.0.0.{i}:4250")).collect();
        assert!(check_auth_addresses(&many).unwrap_err().contains("at most 16"));
    }

    #[test]
    fn workloads_take_the_lowest_number_of_a_duplicated_identity_and_keep_theirs_while_relabelled() {
        let ident = |id: u32, sa: &str| crate::model::IdentityRecord {
            id,
            spiffe_id: format!("spiffe://td/ns/default/sa/{sa}"),
            namespace: "default".into(),
            service_account: sa.into(),
            labels: Default::default(),
        };
        let wl = |name: &str, sa: &str| WorkloadRecord {
            namespace: "default".into(),
            name: name.into(),
            service_account: sa.into(),
            node: "n1".into(),
            ips: vec![],
            labels: Default::default(),
            selectors: vec![],
            svid_ttl_secs: None,
            identity: 0,
            spiffe_id: format!("spiffe://td/ns/default/sa/{sa}"),
        };
        let sourced = std::sync::Mutex::new(Sourced {
            workloads: [wl("a", "web"), wl("b", "new")]
                .into_iter()
                .map(|w| (w.key(), SourcedWorkload::new(w)))
                .collect(),
            ..Default::default()
        });
        // This replica's store has seen one allocation of "web" so far.
        let first = RegistrySnapshot {
            identities: vec![ident(300, "web")],
            ..Default::default()
        };
        let (merged, _) = merge_sourced(Some(&sourced), first, &[]);
        assert_eq!(merged.workloads[0].identity, 300);
        let stored = RegistrySnapshot {
            // Two replicas allocated "web" at once: 300 and 257. The
            // workload resolved before takes the lower number as soon as
            // it is stored (resolutions are kept only while the stored
            // identities stay the same).
            identities: vec![ident(300, "web"), ident(256, "api"), ident(257, "web")],
            ..Default::default()
        };
        let (merged, unresolved) = merge_sourced(Some(&sourced), stored.clone(), &[]);
        assert_eq!(
            merged
                .workloads
                .iter()
                .map(|w| (w.name.as_str(), w.identity))
                .collect::<Vec<_>>(),
            vec![("a", 257)]
        );
        assert_eq!(
            unresolved.iter().map(|w| w.name.as_str()).collect::<Vec<_>>(),
            vec!["b"]
        );
        assert_eq!(
            merged.identities.len(),
            3,
            "the unused duplicate stays visible to the collector"
        );
        // Publishing again shares the records instead of copying them
        // (what keeps a 100k-pod view in memory once).
        let (again, _) = merge_sourced(Some(&sourced), stored.clone(), &merged.workloads);
        assert!(
            again
                .workloads
                .iter()
                .zip(&merged.workloads)
                .all(|(a, b)| Arc::ptr_eq(a, b))
        );

        // "a" is relabelled (and moves) before its new identity is
        // allocated: it keeps its old identity at its new address.
        let published = merged.workloads.clone();
        {
            let mut view = sourced.lock().unwrap();
            let a = view.workloads.get_mut("default/a").unwrap();
            let mut w = (*a.record).clone();
            w.labels.insert("tier".into(), "gold".into());
            w.ips = vec!["10.0.0.9".into()];
            *a = SourcedWorkload::new(w);
        }
        let (merged, unresolved) = merge_sourced(Some(&sourced), stored, &published);
        let held: Vec<_> = merged
            .workloads
            .iter()
            .map(|w| (w.name.as_str(), w.identity, w.labels.len(), w.ips.clone()))
            .collect();
        assert_eq!(held, vec![("a", 257, 0, vec!["10.0.0.9".to_string()])]);
        assert_eq!(
            unresolved.iter().map(|w| w.name.as_str()).collect::<Vec<_>>(),
            vec!["a", "b"],
            "still waiting for its identity"
        );
    }
}
