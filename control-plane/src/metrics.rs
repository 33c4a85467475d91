//! The control plane's Prometheus metrics (`keyway_` prefix) and the
//! readiness components `/readyz` waits for. Label sets are the enums below,
//! so a label value cannot be misspelt at a call site.

use std::sync::Arc;
use std::time::Instant;

use keyway_identity::metrics::{Counter, Gauge, Histogram, LATENCY_BUCKETS, LogLimiter, Readiness, Registry};

/// Who an X509-SVID was issued to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IssuedKind {
    Workload,
    Node,
    ControlPlane,
    Admin,
}

impl IssuedKind {
    pub fn as_str(self) -> &'static str {
        match self {
            IssuedKind::Workload => "workload",
            IssuedKind::Node => "node",
            IssuedKind::ControlPlane => "control-plane",
            IssuedKind::Admin => "admin",
        }
    }
}

/// Why an attestation or SVID request from an agent was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A malformed request: a bad node name or SPIFFE ID, an empty token,
    /// no attestation method.
    BadRequest,
    /// The CSR does not parse, is not self-signed, or names another ID.
    BadCsr,
    /// The join token is unknown, expired, used, or for another node.
    TokenRefused,
    /// Kubernetes refused the service account token, or it is not the
    /// agent's pod's token on that node.
    TokenreviewRefused,
    /// TokenReview (or the pod lookup) could not be done right now.
    TokenreviewUnavailable,
    /// Kubernetes attestation asked of a control plane not in that mode.
    NotKubernetes,
    /// A workload SVID asked for by a node the workload is not placed on.
    NotPlaced,
    /// The caller's certificate is not of an attested node.
    NotAttested,
    /// No client certificate where one is needed.
    Unauthenticated,
    /// The advertised mutual-auth addresses were invalid, or are not the
    /// Node's own (Kubernetes mode).
    BadAddresses,
    /// Too many attestation attempts from one source address.
    RateLimited,
    /// A join token presented to a Kubernetes-mode control plane that does
    /// not accept them (`--allow-join-tokens`).
    JoinTokensOff,
    /// A node SVID from before its node's current registration (revoked).
    Revoked,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::BadRequest => "bad_request",
            Refusal::BadCsr => "bad_csr",
            Refusal::TokenRefused => "token_refused",
            Refusal::TokenreviewRefused => "tokenreview_refused",
            Refusal::TokenreviewUnavailable => "tokenreview_unavailable",
            Refusal::NotKubernetes => "not_kubernetes",
            Refusal::NotPlaced => "not_placed",
            Refusal::NotAttested => "not_attested",
            Refusal::Unauthenticated => "unauthenticated",
            Refusal::BadAddresses => "bad_addresses",
            Refusal::RateLimited => "rate_limited",
            Refusal::JoinTokensOff => "join_tokens_off",
            Refusal::Revoked => "revoked",
        }
    }
}

/// A CA rotation step, as the rotations counter labels it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RotationStep {
    Prepare,
    Activate,
    Retire,
}

impl RotationStep {
    pub fn as_str(self) -> &'static str {
        match self {
            RotationStep::Prepare => "prepare",
            RotationStep::Activate => "activate",
            RotationStep::Retire => "retire",
        }
    }
}

/// Readiness components of the control plane.
pub const READY_STORE: &str = "store";
pub const READY_CA: &str = "ca";
pub const READY_AGENT_API: &str = "agent_api";
/// Kubernetes mode only.
pub const READY_KUBERNETES_CACHES: &str = "kubernetes_caches";

/// The control plane's metric families.
#[derive(Debug, Clone)]
pub struct Metrics {
    pub registry: Arc<Registry>,
    pub readiness: Arc<Readiness>,
    svids_issued: Counter,
    refused: Counter,
    issuance_seconds: Histogram,
    pub(crate) ca_expiry: Gauge,
    ca_rotations: Counter,
    sync_streams: Gauge,
    pub(crate) registry_revision: Gauge,
    pub(crate) is_leader: Gauge,
    issuance_log_records: Gauge,
    issuance_log_bytes: Gauge,
    issuance_log_pruned: Counter,
    /// Refused attestations are logged once per peer and reason per minute.
    pub(crate) refusal_log: Arc<LogLimiter>,
    /// Every listener's connections, refusals and closes.
    pub listeners: keyway_serve::ListenerMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(
            Registry::new(),
            Readiness::new(&[READY_STORE, READY_CA, READY_AGENT_API]),
        )
    }
}

impl Metrics {
    pub fn new(registry: Arc<Registry>, readiness: Arc<Readiness>) -> Self {
        let r = &registry;
        let m = Self {
            svids_issued: r.counter(
                "keyway_svids_issued_total",
                "X509-SVIDs issued, by who they were issued to.",
                &["kind"],
            ),
            refused: r.counter(
                "keyway_svid_requests_refused_total",
                "Attestations and SVID requests refused, by reason.",
                &["reason"],
            ),
            issuance_seconds: r.histogram(
                "keyway_svid_issuance_seconds",
                "Time to check a CSR, sign it and log the issuance.",
                &["kind"],
                LATENCY_BUCKETS,
            ),
            ca_expiry: r.gauge(
                "keyway_ca_expiry_timestamp_seconds",
                "When each signing CA in the bundle expires (Unix seconds), by id and phase.",
                &["ca_id", "phase"],
            ),
            ca_rotations: r.counter(
                "keyway_ca_rotations_total",
                "CA rotation steps this process ran.",
                &["step"],
            ),
            sync_streams: r.gauge("keyway_sync_streams", "Open agent Sync streams.", &[]),
            registry_revision: r.gauge(
                "keyway_registry_revision",
                "Revision of the registry (workloads, policies, nodes) this process serves.",
                &[],
            ),
            is_leader: r.gauge(
                "keyway_is_leader",
                "1 when this replica leads (rotates the CA, reconciles), else 0.",
                &[],
            ),
            issuance_log_records: r.gauge(
                "keyway_issuance_log_records",
                "Records the issuance log holds after the leader's last prune.",
                &[],
            ),
            issuance_log_bytes: r.gauge(
                "keyway_issuance_log_bytes",
                "Bytes of records the issuance log holds after the leader's last prune.",
                &[],
            ),
            issuance_log_pruned: r.counter(
                "keyway_issuance_log_pruned_total",
                "Issuance records dropped by retention (expired past the margin, or over the caps).",
                &[],
            ),
            refusal_log: Arc::new(LogLimiter::per_minute()),
            listeners: keyway_serve::ListenerMetrics::register(r),
            registry,
            readiness,
        };
        for kind in [
            IssuedKind::Workload,
            IssuedKind::Node,
            IssuedKind::ControlPlane,
            IssuedKind::Admin,
        ] {
            m.svids_issued.inc_by(&[kind.as_str()], 0);
        }
        for step in [
            RotationStep::Prepare,
            RotationStep::Activate,
            RotationStep::Retire,
        ] {
            m.ca_rotations.inc_by(&[step.as_str()], 0);
        }
        m.issuance_log_pruned.inc_by(&[], 0);
        m
    }

    pub fn issued(&self, kind: IssuedKind, started: Instant) {
        self.svids_issued.inc(&[kind.as_str()]);
        self.issuance_seconds
            .observe(&[kind.as_str()], started.elapsed().as_secs_f64());
    }

    /// What the issuance log holds after a prune, and what it dropped.
    pub fn issuance_log(&self, out: &crate::store::PruneOutcome) {
        self.issuance_log_records.set(&[], out.kept as f64);
        self.issuance_log_bytes.set(&[], out.kept_bytes as f64);
        self.issuance_log_pruned.inc_by(&[], out.removed as u64);
    }

    pub fn refused(&self, reason: Refusal) {
        self.refused.inc(&[reason.as_str()]);
    }

    pub fn rotated(&self, step: RotationStep) {
        self.ca_rotations.inc(&[step.as_str()]);
    }

    /// Counts an open Sync stream until the guard drops.
    pub fn sync_stream(&self) -> SyncStreamGuard {
        self.sync_streams.add(&[], 1.0);
        SyncStreamGuard(self.sync_streams.clone())
    }
}

/// One open Sync stream (see [`Metrics::sync_stream`]).
#[derive(Debug)]
pub struct SyncStreamGuard(Gauge);

impl Drop for SyncStreamGuard {
    fn drop(&mut self) {
        self.0.add(&[], -1.0);
    }
}
