//! Durable state behind one trait, so the embedded store (sled) and the
//! Kubernetes store (CRDs and Secrets, for replicas) share every caller.
//!
//! Every method that changes state is atomic and durable when it returns: a
//! crash (kill -9) at any point leaves either the whole change or none of it.

mod kube_api;
mod kube_identities;
mod kube_index;
mod kube_nodes;
mod kube_store;
pub mod rules;
mod sled_store;

use std::collections::BTreeMap;

pub use kube_store::KubeStore;
pub use sled_store::SledStore;

use crate::model::{
    CaState, DocumentKind, DocumentRef, IdentityRecord, IssuanceRecord, JoinTokenRecord, NodeRecord,
    PolicyRecord, WorkloadRecord,
};

/// How much of the issuance log is kept ([`Store::prune_issuance`]): a record
/// stays while its certificate is valid and `after_expiry` beyond (so the
/// window follows the longest TTL by itself, per-workload TTLs included),
/// and the log as a whole stays within `max_records` and `max_bytes`, the
/// records whose certificates expire first going first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IssuanceRetention {
    pub after_expiry: std::time::Duration,
    pub max_records: usize,
    pub max_bytes: usize,
}

impl Default for IssuanceRetention {
    fn default() -> Self {
        IssuanceRetention {
            after_expiry: std::time::Duration::from_secs(3600),
            max_records: 250_000,
            max_bytes: 64 << 20,
        }
    }
}

impl IssuanceRetention {
    /// Records whose certificates expired before this (Unix seconds) go.
    pub fn cutoff(&self, now: i64) -> i64 {
        now.saturating_sub(i64::try_from(self.after_expiry.as_secs()).unwrap_or(i64::MAX))
    }
}

/// What a prune removed and what the log holds after it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PruneOutcome {
    pub removed: usize,
    pub kept: usize,
    pub kept_bytes: usize,
    /// Records that could not be read: kept (never judged), and reported.
    pub unreadable: usize,
}

/// What an apply or a delete changed.
#[derive(Debug, Clone, Default)]
pub struct ApplyOutcome {
    pub changes: Vec<String>,
    pub revision: u64,
}

/// The registry as the rest of the control plane sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistrySnapshot {
    pub revision: u64,
    /// Shared: a new version of the registry copies pointers, not records,
    /// and reuses every record that did not change.
    pub workloads: Vec<std::sync::Arc<WorkloadRecord>>,
    pub identities: Vec<IdentityRecord>,
    pub nodes: Vec<NodeRecord>,
    /// In namespace/name order.
    pub policies: Vec<PolicyRecord>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend failed: `message` says what failed and what to do, and
    /// `source` is the backend's own error where there is one (sled's, the
    /// API server's, the encoder's), kept for the error chain.
    #[error("storage error: {message}")]
    Backend {
        message: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    #[error("stored record {what} is corrupt: {reason}")]
    Corrupt { what: String, reason: String },
    #[error("join token refused: {0}")]
    TokenRefused(TokenProblem),
    #[error("{0}")]
    Exhausted(String),
}

/// Why a join token cannot be used. The messages say what to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenProblem {
    #[error("unknown token; create one with `control-plane token create --node NAME`")]
    Unknown,
    #[error("the token was already used; join tokens are single-use, create a new one")]
    Consumed,
    #[error("the token has expired; create a new one")]
    Expired,
    #[error("the token was created for another node; use --node-name matching `token create --node`")]
    WrongNode,
}

pub type StoreResult<T> = Result<T, StoreError>;

impl StoreError {
    /// A backend failure that `message` describes in full.
    pub fn backend(message: impl Into<String>) -> Self {
        StoreError::Backend {
            message: message.into(),
            source: None,
        }
    }

    /// A backend failure caused by `source` (which `message` may quote).
    pub fn backend_from(
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        StoreError::Backend {
            message: message.into(),
            source: Some(Box::new(source)),
        }
    }
}

pub use rules::token_problem;

/// Durable control-plane state.
#[async_trait::async_trait]
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    async fn load_ca(&self) -> StoreResult<Option<CaState>>;
    async fn save_ca(&self, state: &CaState) -> StoreResult<()>;

    async fn put_join_token(&self, token_hash: &[u8], record: &JoinTokenRecord) -> StoreResult<()>;
    /// The token with this hash, if any: a read, so a wrong token is refused
    /// before anything is signed or locked.
    async fn join_token(&self, token_hash: &[u8]) -> StoreResult<Option<JoinTokenRecord>>;
    /// Consumes the token, registers the node (allocating its node id on first
    /// attestation) and logs the node SVID, all in one atomic step. A token can
    /// be consumed once, ever.
    /// `registration` is the tag a new registration gets (an existing one
    /// keeps its own).
    async fn consume_join_token(
        &self,
        token_hash: &[u8],
        node: &str,
        now: i64,
        registration: u32,
        issued: &IssuanceRecord,
    ) -> StoreResult<NodeRecord>;

    /// Registers a node attested without a join token (Kubernetes: a
    /// projected service account token checked with TokenReview),
    /// allocating its node id on first attestation, and logs the node SVID,
    /// in one atomic step. Attesting again keeps the node id.
    async fn register_node(
        &self,
        node: &str,
        now: i64,
        registration: u32,
        issued: &IssuanceRecord,
    ) -> StoreResult<NodeRecord>;

    async fn log_issuance(&self, record: &IssuanceRecord) -> StoreResult<()>;
    async fn issuance_log(&self) -> StoreResult<Vec<IssuanceRecord>>;
    /// Drops what [`IssuanceRetention`] no longer keeps, so the log stops
    /// growing at steady state. Safe to run beside `log_issuance` (from any
    /// replica) and to repeat.
    async fn prune_issuance(&self, keep: &IssuanceRetention, now: i64) -> StoreResult<PruneOutcome>;

    /// Upserts workloads (allocating identities as needed) and policies
    /// (replacing any with the same namespace/name), all or nothing. The
    /// revision grows only when something changed.
    async fn apply(
        &self,
        workloads: Vec<WorkloadRecord>,
        policies: Vec<PolicyRecord>,
    ) -> StoreResult<ApplyOutcome>;
    /// Removes the named workloads and policies, all or nothing; the
    /// outcome says, per reference and in order, whether it was deleted or
    /// not found. Identities stay allocated (never reused). The revision
    /// grows only when something was deleted.
    async fn delete(&self, refs: Vec<DocumentRef>) -> StoreResult<ApplyOutcome>;
    /// Sets the mutual-auth addresses of an attested node. Returns whether
    /// they changed (the revision grows only then); `None` when no such
    /// node is registered.
    async fn set_node_addresses(&self, node: &str, addresses: Vec<String>) -> StoreResult<Option<bool>>;
    /// The numeric identity of each of `wanted` (namespace, service
    /// account and identity labels; `id` is ignored), in order, allocating
    /// one for each that has none yet. Kubernetes mode calls this for the
    /// pods it sees, storing nothing else about them. Allocation is
    /// create-if-absent: a number is never handed to two identities, also
    /// by two replicas at once.
    async fn allocate_identities(&self, wanted: &[IdentityRecord]) -> StoreResult<Vec<IdentityRecord>>;
    /// Forgets the identities among `ids` that no stored workload uses
    /// (checked again here: one in use stays; Kubernetes mode stores no
    /// workloads, so there the caller's check is the one that counts).
    /// Their numbers are never handed out again. Returns how many went.
    /// Callers serialise registry writes (the control plane's registry lock).
    async fn forget_identities(&self, ids: &[u32]) -> StoreResult<usize>;
    /// Revokes a node: its record goes (renewals and calls with its SVID are
    /// refused, its Sync stream ends, peers flush its auth entries). Its node
    /// id is not handed out again. Returns whether the node was registered.
    async fn revoke_node(&self, node: &str) -> StoreResult<bool>;
    async fn registry(&self) -> StoreResult<RegistrySnapshot>;

    /// Changes written by other processes sharing this store (the other
    /// replicas of a Kubernetes-backed store): the value grows whenever the
    /// shared state (CA material or registry) changed underneath this
    /// process. `None` for a store only this process writes.
    fn subscribe_changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }
}

/// Labels that vary between replicas of the same workload and so must not
/// split its identity (the same exclusions Cilium makes).
const NON_IDENTITY_LABELS: &[&str] = &[
    "pod-template-hash",
    "controller-revision-hash",
    "pod-template-generation",
    "statefulset.kubernetes.io/pod-name",
    "apps.kubernetes.io/pod-index",
    "batch.kubernetes.io/job-completion-index",
];

/// The labels that take part in a workload's numeric identity.
pub fn identity_labels(labels: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    labels
        .iter()
        .filter(|(k, _)| is_identity_label(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn is_identity_label(key: &str) -> bool {
    !NON_IDENTITY_LABELS.contains(&key)
}

/// The allocation key of an identity: canonical, so the same inputs always
/// map to the same numeric identity.
pub fn identity_key(namespace: &str, service_account: &str, labels: &BTreeMap<String, String>) -> String {
    let mut key = format!("{namespace}\u{0}{service_account}");
    for (k, v) in labels.iter().filter(|(k, _)| is_identity_label(k)) {
        key.push('\u{0}');
        key.push_str(k);
        key.push('=');
        key.push_str(v);
    }
    key
}

/// The order of [`WorkloadRecord::key`] (`namespace/name`), compared
/// without building the keys.
pub fn key_order(a_namespace: &str, a_name: &str, b_namespace: &str, b_name: &str) -> std::cmp::Ordering {
    let a = a_namespace
        .bytes()
        .chain(std::iter::once(b'/'))
        .chain(a_name.bytes());
    let b = b_namespace
        .bytes()
        .chain(std::iter::once(b'/'))
        .chain(b_name.bytes());
    a.cmp(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replica_labels_do_not_split_identity() {
        let mut a = BTreeMap::from([("app".to_string(), "api".to_string())]);
        let b = a.clone();
        a.insert("pod-template-hash".into(), "abc".into());
        assert_eq!(identity_key("ns", "sa", &a), identity_key("ns", "sa", &b));
        assert_ne!(identity_key("ns", "sa", &a), identity_key("ns", "other", &b));
    }
}
