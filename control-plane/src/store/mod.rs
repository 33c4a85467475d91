//! Durable state behind one trait, so the embedded store (sled) and the
//! Kubernetes store (CRDs and Secrets, for replicas) share every caller.
//!
//! Every method that changes state is atomic and durable when it returns: a
//! crash (kill -9) at any point leaves either the whole change or none of it.

mod kube_identities;
mod kube_index;
mod kube_nodes;
mod kube_store;
pub mod model;
mod sled_store;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use kube_store::KubeStore;
pub use sled_store::SledStore;

/// Bytes that must never reach a log or `Debug` output (private keys).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(#[serde(with = "b64")] pub Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

mod b64 {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        STANDARD.decode(s).map_err(serde::de::Error::custom)
    }
}

mod b64_vec {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer, ser::SerializeSeq};

    pub fn serialize<S: Serializer>(v: &[Vec<u8>], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(v.len()))?;
        for item in v {
            seq.serialize_element(&STANDARD.encode(item))?;
        }
        seq.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<u8>>, D::Error> {
        Vec::<String>::deserialize(d)?
            .into_iter()
            .map(|s| STANDARD.decode(s).map_err(serde::de::Error::custom))
            .collect()
    }
}

/// Where a signing authority is in its life (DESIGN.md section 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CaPhase {
    /// In the bundle, not signing yet.
    Prepared,
    /// Signs everything new.
    Active,
    /// Replaced; stays in the bundle until nothing it signed can be valid.
    Old,
}

/// One X.509 signing authority and the JWT key that rotates with it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaRecord {
    pub id: String,
    pub phase: CaPhase,
    #[serde(with = "b64")]
    pub cert_der: Vec<u8>,
    pub key_pkcs8: Secret,
    pub not_before: i64,
    pub not_after: i64,
    /// When it stopped signing (phase `Old`).
    pub superseded_at: Option<i64>,
    pub jwt_kid: String,
    pub jwt_key_pkcs8: Secret,
}

/// All CA material, stored as one record so a rotation step is one atomic write.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CaState {
    pub authorities: Vec<CaRecord>,
    /// `spiffe_sequence` of the bundle; grows on every change of its contents.
    pub bundle_sequence: u64,
    /// With an upstream CA: the certificates above Keyway's intermediate, the
    /// last one being the root published in the bundle.
    #[serde(with = "b64_vec", default)]
    pub upstream_chain: Vec<Vec<u8>>,
}

impl CaState {
    /// The authority that signs (phase `Active`), if there is one.
    pub fn active(&self) -> Option<&CaRecord> {
        self.authorities.iter().find(|a| a.phase == CaPhase::Active)
    }
}

/// A join token as stored: only its SHA-256, never the token itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinTokenRecord {
    pub node: String,
    pub created_at: i64,
    pub expires_at: i64,
    pub consumed_at: Option<i64>,
}

/// A standalone `Workload` document after validation, with its identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadRecord {
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    pub node: String,
    pub ips: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub selectors: Vec<String>,
    pub svid_ttl_secs: Option<u64>,
    /// Filled by the store on apply.
    #[serde(default)]
    pub identity: u32,
    #[serde(default)]
    pub spiffe_id: String,
}

impl WorkloadRecord {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A KeywayNetworkPolicy after validation. Namespace and name identify it;
/// applying one with the same name replaces the old one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRecord {
    pub namespace: String,
    pub name: String,
    pub spec: crate::policy::PolicySpec,
}

impl PolicyRecord {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A numeric security identity: one per (namespace, service account,
/// identity-relevant labels), never reused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityRecord {
    pub id: u32,
    pub spiffe_id: String,
    pub namespace: String,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
}

/// An attested node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: String,
    pub node_id: u16,
    pub attested_at: i64,
    /// This registration's tag: chosen at random when the node is first
    /// attested (or attested again after a revocation) and carried in the
    /// serial number of every node SVID issued to it, so an SVID of an
    /// earlier, revoked registration never authenticates the node again.
    /// Records written before revocation existed load with 0 (no check).
    #[serde(default)]
    pub registration: u32,
    /// Where its agent takes mutual-authentication handshakes ("IP:PORT"),
    /// as it last advertised them when opening Sync. Records written before
    /// addresses existed load with none.
    #[serde(default)]
    pub addresses: Vec<String>,
}

/// The kinds of document the registry stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum DocumentKind {
    Workload,
    KeywayNetworkPolicy,
}

impl DocumentKind {
    /// The name `apply` and `delete` print (kubectl style, lowercase).
    pub fn noun(self) -> &'static str {
        match self {
            DocumentKind::Workload => "workload",
            DocumentKind::KeywayNetworkPolicy => "keywaynetworkpolicy",
        }
    }
}

/// A document named by kind, namespace and name (what `delete -f` reads).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct DocumentRef {
    pub kind: DocumentKind,
    pub namespace: String,
    pub name: String,
}

impl DocumentRef {
    /// The store key, the same as [`WorkloadRecord::key`] and [`PolicyRecord::key`].
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// One issued certificate (the issuance log).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuanceRecord {
    pub serial: String,
    pub spiffe_id: String,
    /// The node that asked, `admin` for the CLI, `control-plane` for itself.
    pub requester: String,
    pub ca_id: String,
    pub issued_at: i64,
    pub not_after: i64,
}

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
    #[error("storage error: {0}")]
    Backend(String),
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

pub use model::token_problem;

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

    #[test]
    fn node_records_written_before_addresses_still_load() {
        let old = r#"{"name":"node-a","node_id":3,"attested_at":1700000000}"#;
        let rec: NodeRecord = serde_json::from_str(old).unwrap();
        assert_eq!(rec.node_id, 3);
        assert!(rec.addresses.is_empty());
    }

    #[test]
    fn secrets_do_not_show_in_debug() {
        let s = Secret(b"private".to_vec());
        assert_eq!(format!("{s:?}"), "<redacted>");
    }
}
