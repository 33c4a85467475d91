//! The control plane's Prometheus metrics (`keyway_` prefix) and the
//! readiness components `/readyz` waits for. Label sets are the structs
//! below over the enums below, so a label cannot be left out or misspelt at
//! a call site.

use std::sync::Arc;
use std::time::Instant;

use keyway_serve::telemetry::{LogLimiter, Readiness, Registry, gauge_value, latency_histogram};

use crate::model::CaPhase;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;

/// Who an X509-SVID was issued to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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

keyway_serve::label_values_by_as_str!(IssuedKind, Refusal, RotationStep, CaPhase);

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KindLabels {
    kind: IssuedKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabels {
    reason: Refusal,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StepLabels {
    step: RotationStep,
}

/// One signing CA in the bundle: its id, and `prepared`, `active` or
/// `old`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct CaLabels {
    pub ca_id: String,
    pub phase: CaPhase,
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
    svids_issued: Family<KindLabels, Counter>,
    refused: Family<ReasonLabels, Counter>,
    issuance_seconds: Family<KindLabels, Histogram>,
    pub(crate) ca_expiry: Family<CaLabels, Gauge>,
    ca_rotations: Family<StepLabels, Counter>,
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
            svids_issued: r.register(
                "keyway_svids_issued",
                "X509-SVIDs issued, by who they were issued to.",
                Family::default(),
            ),
            refused: r.register(
                "keyway_svid_requests_refused",
                "Attestations and SVID requests refused, by reason.",
                Family::default(),
            ),
            issuance_seconds: r.register(
                "keyway_svid_issuance_seconds",
                "Time to check a CSR, sign it and log the issuance.",
                Family::new_with_constructor(latency_histogram),
            ),
            ca_expiry: r.register(
                "keyway_ca_expiry_timestamp_seconds",
                "When each signing CA in the bundle expires (Unix seconds), by id and phase.",
                Family::default(),
            ),
            ca_rotations: r.register(
                "keyway_ca_rotations",
                "CA rotation steps this process ran.",
                Family::default(),
            ),
            sync_streams: r.register(
                "keyway_sync_streams",
                "Open agent Sync streams.",
                Gauge::default(),
            ),
            registry_revision: r.register(
                "keyway_registry_revision",
                "Revision of the registry (workloads, policies, nodes) this process serves.",
                Gauge::default(),
            ),
            is_leader: r.register(
                "keyway_is_leader",
                "1 when this replica leads (rotates the CA, reconciles), else 0.",
                Gauge::default(),
            ),
            issuance_log_records: r.register(
                "keyway_issuance_log_records",
                "Records the issuance log holds after the leader's last prune.",
                Gauge::default(),
            ),
            issuance_log_bytes: r.register(
                "keyway_issuance_log_bytes",
                "Bytes of records the issuance log holds after the leader's last prune.",
                Gauge::default(),
            ),
            issuance_log_pruned: r.register(
                "keyway_issuance_log_pruned",
                "Issuance records dropped by retention (expired past the margin, or over the caps).",
                Counter::default(),
            ),
            refusal_log: Arc::new(LogLimiter::per_minute()),
            listeners: keyway_serve::ListenerMetrics::register(r),
            registry,
            readiness,
        };
        // Every kind and step reads 0 from the start.
        for kind in [
            IssuedKind::Workload,
            IssuedKind::Node,
            IssuedKind::ControlPlane,
            IssuedKind::Admin,
        ] {
            m.svids_issued.get_or_create(&KindLabels { kind }).inc_by(0);
        }
        for step in [
            RotationStep::Prepare,
            RotationStep::Activate,
            RotationStep::Retire,
        ] {
            m.ca_rotations.get_or_create(&StepLabels { step }).inc_by(0);
        }
        m
    }

    pub fn issued(&self, kind: IssuedKind, started: Instant) {
        let labels = KindLabels { kind };
        self.svids_issued.get_or_create(&labels).inc();
        self.issuance_seconds
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
    }

    /// What the issuance log holds after a prune, and what it dropped.
    pub fn issuance_log(&self, out: &crate::store::PruneOutcome) {
        self.issuance_log_records.set(gauge_value(out.kept));
        self.issuance_log_bytes.set(gauge_value(out.kept_bytes));
        self.issuance_log_pruned.inc_by(out.removed as u64);
    }

    pub fn refused(&self, reason: Refusal) {
        self.refused.get_or_create(&ReasonLabels { reason }).inc();
    }

    pub fn rotated(&self, step: RotationStep) {
        self.ca_rotations.get_or_create(&StepLabels { step }).inc();
    }

    /// Counts an open Sync stream until the guard drops.
    pub fn sync_stream(&self) -> SyncStreamGuard {
        self.sync_streams.inc();
        SyncStreamGuard(self.sync_streams.clone())
    }
}

/// One open Sync stream (see [`Metrics::sync_stream`]).
#[derive(Debug)]
pub struct SyncStreamGuard(Gauge);

impl Drop for SyncStreamGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
