//! The control plane's core, as one value: it owns the store, the CA
//! (published via a `watch` so the TLS configs, sync streams and admin API
//! see rotations at once), the cluster view (the registry with its compiled
//! policy), and its own serving SVID. Split by job: [`attest`] (nodes),
//! [`issue`] (SVIDs and the issuance log), [`rotation`] (the CA),
//! [`registry`] (workloads, identities, policies).
//!
//! Every operation here is what an API call does after authentication; the
//! servers (`agent_api`, `admin`) and Kubernetes mode only translate and
//! drive.

mod attest;
mod issue;
mod registry;
mod rotation;

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
use crate::metrics::{CaLabels, IssuedKind, Metrics, Refusal, RotationStep};
use keyway_serve::telemetry::gauge_value;
use std::collections::{HashMap, HashSet};

use crate::model::{
    CaState, DocumentKind, DocumentRef, IssuanceRecord, JoinTokenRecord, NodeRecord, PolicyRecord,
    WorkloadRecord,
};
use crate::store::{ApplyOutcome, RegistrySnapshot, Store, StoreError};
use crate::sync::Cluster;

use crate::clock::now_unix;
use crate::error::ApiError;

pub use attest::{MAX_AUTH_ADDRESSES, NodeAddresses, NodeSvid, check_auth_addresses};
use registry::Sourced;
pub use registry::{SourcedChanges, SourcedOutcome};

struct Inner {
    cfg: Config,
    ca_cfg: CaConfig,
    store: Arc<dyn Store>,
    authority: watch::Sender<Arc<Authority>>,
    bundle: watch::Sender<Arc<TrustBundle>>,
    /// Serialises CA state changes (rotation steps).
    ca_lock: Mutex<()>,
    /// The registry with its compiled policy; republished when either changes.
    cluster: watch::Sender<Arc<Cluster>>,
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
        let cluster = Arc::new(Cluster::new(stored, cfg.policy_budget));
        let cfg_attest_per_minute = cfg.attest_per_minute;
        let (bundle, _) = watch::channel(authority.bundle());
        let (authority, _) = watch::channel(authority);
        let (cluster, _) = watch::channel(cluster);
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
                cluster,
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
            // Scrapes are one at a time: no scrape sees the family cleared.
            m.ca_expiry.clear();
            for a in &authority.state().authorities {
                let labels = CaLabels {
                    ca_id: a.id.clone(),
                    phase: a.phase,
                };
                m.ca_expiry.get_or_create(&labels).set(a.not_after);
            }
            m.registry_revision
                .set(gauge_value(cp.inner.cluster.borrow().records.revision));
            m.is_leader.set(i64::from(cp.is_leader()));
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

    pub fn own_cert(&self) -> watch::Receiver<Option<Arc<CertifiedKey>>> {
        self.inner.own_cert.subscribe()
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

    /// Counts a refusal by reason; returns the error to send back.
    fn refuse(&self, reason: Refusal, e: impl Into<ApiError>) -> ApiError {
        self.inner.metrics.refused(reason);
        e.into()
    }

    /// Counts a refusal the caller found (unauthenticated, not attested).
    pub fn count_refusal(&self, reason: Refusal) {
        self.inner.metrics.refused(reason);
    }
}
