//! The Kubernetes store: the control plane's shared state kept as objects in
//! its own namespace, so several replicas can serve from one source of truth
//! (DESIGN.md section 3, `replicas: 2` in the chart).
//!
//! # Layout
//!
//! | Object                               | Key                | Holds                                       |
//! |--------------------------------------|--------------------|---------------------------------------------|
//! | Secret `keyway-ca` (Opaque)          | `ca.json`          | [`CaState`]: every authority and its keys   |
//! | ConfigMap `keyway-state`             | `state.json`       | the counters (below)                        |
//! | ConfigMaps `keyway-identity-<n>`     | `identity.json`    | one numeric identity each                   |
//! | ConfigMaps `keyway-node-<node>`      | `node.json`        | one node record each                        |
//! | ConfigMaps `keyway-join-token-<hex>` | `token.json`       | one join token each                         |
//! | ConfigMaps `keyway-issuance-<n>`     | one key per serial | the issuance log, `n` from 0                |
//!
//! Only what Keyway allocates is stored, one object per record. Pods and
//! policies are not: the API server holds them, and Kubernetes mode reads
//! them from its watch caches, so nothing here grows with the number of
//! pods, and no single object grows with the number of nodes or tokens.
//! `state.json` holds the next numeric identity and the next node id.
//! Identity objects: [`super::kube_identities`]; node and token objects:
//! [`super::kube_nodes`].
//! Private keys live only in the Secret, so RBAC can give readers of the
//! registry no access to key material. Every object is created on first use
//! and labelled `app.kubernetes.io/managed-by: keyway` and
//! `keyway.dev/component`; every write sets the annotation
//! `keyway.dev/last-writer` to the writing replica, so `kubectl get -o yaml`
//! says who wrote last.
//!
//! # Why nothing is lost or handed out twice
//!
//! Every change to an object is one read-modify-write of that object, made
//! conditional on the `metadata.resourceVersion` it read (a replace, which
//! the API server refuses with 409 Conflict when anyone wrote the object in
//! between), or a create, which fails with AlreadyExists when the name is
//! taken. A refused write changed nothing, so the change is applied again to
//! a fresh read: the change is a function of the record (consume this
//! token, allocate the next number), not a diff computed from an old copy.
//! An acknowledged write is in etcd's quorum, so it is durable when the call
//! returns.
//!
//! - Counters (`next_identity`, `next_node_id`) only grow, and are written
//!   before the object that uses a number is created: a crash in between
//!   leaves an unused number, never one given twice.
//! - A join token is consumed by a conditional write of its object, so of
//!   two replicas racing with the same token exactly one succeeds; the
//!   other re-reads and sees it consumed.
//! - Attestation touches several objects, in an order that keeps every
//!   failure safe: the token is checked (a refused one writes nothing), the
//!   node SVID is logged, the token is consumed, then the node record is
//!   written. Part-way failures leave at worst a logged SVID that was never
//!   handed out, or a spent token and no node (the attestation fails; a new
//!   token is needed).
//! - Within one process the state is written by one call at a time, so
//!   conflicts happen only between replicas and the bounded retries
//!   ([`MAX_ATTEMPTS`]) are a safety net, not a throughput limit.
//!
//! The issuance log is appended to: `log_issuance` hands records to one
//! writer task per process, which batches everything queued into one write of
//! the newest chunk (the same conditional replace), keyed by serial. A serial
//! already in the chunk is not written again, so a retried batch is recorded
//! once. A chunk that would pass [`CHUNK_LIMIT`] is left alone and the next
//! one is created (409 AlreadyExists means another replica rolled first: use
//! theirs). Format 2 kept node SVIDs in `pending_issuance` in the state until
//! they were moved to the log; what a crash left there is moved on open, and
//! `issuance_log` reads pending records before the chunks and merges by
//! serial, so each is returned once wherever it sits.
//!
//! The CA Secret is written whole. `save_ca` is a compare-and-swap against
//! the version this process last loaded or saved: re-applying a whole CA
//! state over someone else's would silently drop their authorities, so a
//! conflict is an error that says to reload, not a retry. (Without a prior
//! `load_ca` it writes unconditionally.) Two replicas creating the CA at the
//! same first start therefore cannot both win.
//!
//! # Changes made by other replicas
//!
//! [`Store::subscribe_changes`] is fed by one watch on `keyway-state` and one
//! on `keyway-ca` (metadata only, by name; the default list-then-watch mode,
//! which every API server version serves), and by the identity and node
//! object watches ([`super::kube_index`]). Every resourceVersion this process
//! writes to the state or the CA is remembered, and its own identity and
//! node writes are in its indexes before their events arrive; any other
//! change (or a deletion) bumps the counter. A watch event can beat the
//! reply to this process's own write, which then counts as foreign: the
//! signal may fire without a foreign change, never the other way round.
//! Watch errors are retried with kube-runtime's default exponential backoff.
//!
//! # Limits
//!
//! - Kubernetes caps an object at 1 MiB. Every object here holds one record
//!   except the log chunks (capped below) and the CA Secret (a few
//!   authorities). A state not yet migrated from format 2 is refused above
//!   [`STATE_LIMIT`] (900 KiB) with [`StoreError::Exhausted`].
//! - Join tokens that expired more than [`rules::TOKEN_RETENTION_SECS`] ago
//!   are deleted by a sweep on token writes, at most every
//!   [`TOKEN_SWEEP_SECS`] (presenting one then reads "unknown token": still
//!   refused).
//! - The issuance log is pruned by whole chunks (about 2000 records each),
//!   never the newest: `prune_issuance` deletes a chunk once every
//!   certificate in it is past the retention window, then the oldest while
//!   the log is over its caps, each delete conditional on the version judged.
//!   A chunk at least three quarters past the window but held by a few
//!   long-lived records (node SVIDs live a day) is compacted: those records
//!   are appended to the newest chunk first, then the chunk is deleted (a
//!   crash between leaves a record in two chunks; readers merge by serial).
//!   A writer whose head chunk was pruned under it moves to the newest one.
//! - A write whose reply is lost (connection reset, timeout) is reported as
//!   an error although the API server may have applied it.
//! - The service account needs get, list, watch, create, update and delete
//!   on configmaps, and get, create and update on secrets, in the namespace.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret as KubeSecret};
use kube::api::{Api, DeleteParams, ListParams, PostParams, Preconditions};
use kube::core::PartialObjectMeta;
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::{mpsc, oneshot, watch};

use super::kube_api::{
    COMPONENT, LAST_WRITER, api_error, is_already_exists, is_conflict, is_not_found, object_meta,
};
use super::kube_identities as ids;
use super::kube_index;
use super::kube_nodes as nodes;
use super::*;
use keyway_identity::lock::Recover;
use serde::{Deserialize, Serialize};

const STATE: &str = "keyway-state";
const STATE_KEY: &str = "state.json";
const CA: &str = "keyway-ca";
const CA_KEY: &str = "ca.json";
const CHUNK_PREFIX: &str = "keyway-issuance-";

const ISSUANCE_COMPONENT: &str = "issuance-log";

/// The largest `state.json` written: Kubernetes refuses objects over 1 MiB,
/// and the metadata and the JSON string escaping need room.
const STATE_LIMIT: usize = 900 * 1024;
/// A chunk of the issuance log is closed before it grows past this.
const CHUNK_LIMIT: usize = 512 * 1024;
/// Conditional writes refused by a concurrent writer before giving up.
const MAX_ATTEMPTS: u32 = 10;

/// `state.json` format; a replica refuses state written by a newer format.
///
/// - 1: `state.json` also held every workload (pods copied in), policy and
///   identity. Read and migrated on open: the identities become objects,
///   the copies are dropped (the API server holds pods and policies).
/// - 2: identities are objects of their own ([`super::kube_identities`]).
/// - 3: so are node records and join tokens ([`super::kube_nodes`]);
///   `state.json` holds only the counters. Format 2's nodes and tokens are
///   migrated on open.
const FORMAT: u32 = 3;
/// The most records one log write carries.
const MAX_BATCH: usize = 512;
/// Resource versions of this process's own writes remembered for the watch.
const OWN_WRITES_REMEMBERED: usize = 256;

/// Kubernetes-backed [`Store`], so several control-plane replicas share one
/// state: the CA in Secret `keyway-ca`, the counters in ConfigMap
/// `keyway-state`, one ConfigMap per numeric identity, node and join token,
/// the issuance log in ConfigMaps `keyway-issuance-<n>`, all in the control
/// plane's namespace.
/// The top of `store/kube_store.rs` gives the layout, why concurrent
/// replicas lose nothing and hand out nothing twice, and the limits.
pub struct KubeStore {
    namespace: String,
    writer: String,
    configmaps: Api<ConfigMap>,
    secrets: Api<KubeSecret>,
    /// One state write in flight per process: writers in the same process
    /// would only conflict with each other.
    state_writer: tokio::sync::Mutex<()>,
    /// One move of pending node SVIDs to the log at a time.
    drain_lock: tokio::sync::Mutex<()>,
    /// The CA Secret as this process last saw it, for `save_ca`'s compare-and-swap.
    ca_seen: Mutex<CaSeen>,
    own_writes: Arc<OwnWrites>,
    log: mpsc::Sender<LogRequest>,
    changes: watch::Sender<u64>,
    watch_task: tokio::task::JoinHandle<()>,
    identities: ids::SharedIndex,
    identity_task: tokio::task::JoinHandle<()>,
    nodes: kube_index::Shared<nodes::NodeIndex>,
    node_task: tokio::task::JoinHandle<()>,
    /// The `now` of the last sweep of forgotten join tokens.
    tokens_swept_at: Mutex<Option<i64>>,
}

/// How often (in the callers' clock) join token writes sweep the tokens
/// past their retention.
const TOKEN_SWEEP_SECS: i64 = 600;
/// How long a format migration may go on before another replica takes it
/// over (its migrator is taken to have crashed).
const MIGRATION_TAKEOVER_SECS: i64 = 300;

/// A format migration under way ([`KubeStore::migrate`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Migration {
    /// The replica copying the records.
    by: String,
    /// When it started (Unix seconds).
    since: i64,
}

impl std::fmt::Debug for KubeStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeStore")
            .field("namespace", &self.namespace)
            .field("writer", &self.writer)
            .finish_non_exhaustive()
    }
}

impl Drop for KubeStore {
    fn drop(&mut self) {
        // The log writer ends by itself once its queue's sender is gone.
        self.watch_task.abort();
        self.identity_task.abort();
        self.node_task.abort();
    }
}

/// What this process knows of the CA Secret.
#[derive(Debug, Clone)]
enum CaSeen {
    /// Never read: `save_ca` writes unconditionally.
    Unknown,
    /// Read, and there was none: `save_ca` creates it, and fails if someone else did first.
    Absent,
    /// Read or written at this resourceVersion.
    At(String),
}

impl KubeStore {
    /// Connects to the store in `namespace`, creating the state ConfigMap on
    /// first use. `writer` names this replica (the pod name) in the
    /// `keyway.dev/last-writer` annotation. Starts the issuance log writer
    /// and the watch behind [`Store::subscribe_changes`]; both stop when the
    /// store is dropped.
    pub async fn open(client: kube::Client, namespace: &str, writer: &str) -> StoreResult<KubeStore> {
        let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
        let secrets: Api<KubeSecret> = Api::namespaced(client.clone(), namespace);
        let own_writes = Arc::new(OwnWrites::default());

        // The objects first: a state created now (first start, or restored
        // after someone deleted it) starts its counters past every number
        // an object holds, so none is handed out twice.
        let identities: ids::SharedIndex = kube_index::load(&configmaps)
            .await
            .map_err(|e| api_error(e, "list", "configmaps", "", namespace))?;
        let node_index: kube_index::Shared<nodes::NodeIndex> = kube_index::load(&configmaps)
            .await
            .map_err(|e| api_error(e, "list", "configmaps", "", namespace))?;
        let state = match configmaps.get_opt(STATE).await {
            Ok(Some(cm)) => cm,
            Ok(None) => {
                let mut cm = ConfigMap {
                    metadata: object_meta(STATE, "state"),
                    ..Default::default()
                };
                let mut fresh = SharedState::new();
                if let Some(top) = ids::lock(&identities).all().iter().map(|i| u64::from(i.id)).max() {
                    fresh.next_identity = fresh.next_identity.max(top + 1);
                }
                if let Some(top) = kube_index::lock(&node_index)
                    .all()
                    .iter()
                    .map(|n| u64::from(n.node_id))
                    .max()
                {
                    fresh.next_node_id = fresh.next_node_id.max(top + 1);
                }
                set_state(&mut cm, &fresh, writer)?;
                match configmaps.create(&PostParams::default(), &cm).await {
                    Ok(created) => {
                        own_writes.record(&created);
                        tracing::info!(
                            namespace,
                            configmap = STATE,
                            next_identity = fresh.next_identity,
                            next_node_id = fresh.next_node_id,
                            "created the shared state"
                        );
                        created
                    }
                    Err(e) if is_already_exists(&e) => configmaps
                        .get(STATE)
                        .await
                        .map_err(|e| api_error(e, "get", "configmaps", STATE, namespace))?,
                    Err(e) => return Err(api_error(e, "create", "configmaps", STATE, namespace)),
                }
            }
            Err(e) => return Err(api_error(e, "get", "configmaps", STATE, namespace)),
        };
        // Fail now, not on the first write, when the state cannot be read.
        SharedState::from_configmap(&state)?;
        let ca_version = secrets
            .get_metadata_opt(CA)
            .await
            .map_err(|e| api_error(e, "get", "secrets", CA, namespace))?
            .and_then(|m| m.metadata.resource_version);

        let head = newest_chunk(&configmaps, namespace).await?;
        let (log, queue) = mpsc::channel(1024);
        let chunks = IssuanceLog {
            api: configmaps.clone(),
            namespace: namespace.to_owned(),
            writer: writer.to_owned(),
            head_index: head,
            head: None,
        };
        tokio::spawn(chunks.run(queue));

        let (changes, _) = watch::channel(0u64);
        let identity_task = tokio::spawn(kube_index::follow(
            configmaps.clone(),
            identities.clone(),
            changes.clone(),
        ));
        let node_task = tokio::spawn(kube_index::follow(
            configmaps.clone(),
            node_index.clone(),
            changes.clone(),
        ));
        let watch_task = tokio::spawn(watch_shared(
            Api::namespaced(client.clone(), namespace),
            Api::namespaced(client, namespace),
            own_writes.clone(),
            [state.metadata.resource_version.clone(), ca_version],
            changes.clone(),
        ));

        let store = KubeStore {
            namespace: namespace.to_owned(),
            writer: writer.to_owned(),
            configmaps,
            secrets,
            state_writer: tokio::sync::Mutex::new(()),
            drain_lock: tokio::sync::Mutex::new(()),
            ca_seen: Mutex::new(CaSeen::Unknown),
            own_writes,
            log,
            changes,
            watch_task,
            identities,
            identity_task,
            nodes: node_index,
            node_task,
            tokens_swept_at: Mutex::new(None),
        };
        store.migrate().await?;
        store.raise_counters().await?;
        // Node SVIDs a replica recorded but did not get to move (it crashed).
        store.drain_pending().await;
        Ok(store)
    }

    /// Earlier formats kept identities (format 1, with copies of pods and
    /// policies), node records and join tokens (formats 1 and 2) inside
    /// `state.json`. Migration, safe against crashes, replicas of the old
    /// format still running (a rolling upgrade) and new replicas starting
    /// together:
    ///
    /// 1. Freeze: one conditional write raises the format and names this
    ///    replica the migrator. From then on old replicas refuse the state
    ///    (a newer format), so the records to copy can no longer change, and
    ///    new replicas wait for the migration instead of serving.
    /// 2. Copy: each record becomes its object (create-if-absent: the values
    ///    are frozen, so an object a crashed migrator created holds them).
    /// 3. Finish: a write conditional on this replica still being the
    ///    migrator removes the copies from the state.
    ///
    /// A migrator silent for [`MIGRATION_TAKEOVER_SECS`] (it crashed) is
    /// replaced by the next replica that looks.
    async fn migrate(&self) -> StoreResult<()> {
        let mut waited_on: Option<String> = None;
        loop {
            let (_, state) = self.read_state().await?;
            let now = crate::clock::now_unix();
            match &state.migration {
                None if state.format >= FORMAT => return Ok(()),
                Some(m) if m.by == self.writer => {}
                Some(m) if now.saturating_sub(m.since) < MIGRATION_TAKEOVER_SECS => {
                    if waited_on.as_deref() != Some(m.by.as_str()) {
                        tracing::info!(migrator = %m.by, "waiting for another replica to migrate the shared state");
                        waited_on = Some(m.by.clone());
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
                // Not started, or its migrator went silent: freeze, or take
                // over, unless someone else did first.
                seen => {
                    let seen = seen.as_ref().map(|m| m.by.clone());
                    let writer = self.writer.clone();
                    self.update_state("format migration (freeze)", |fresh| {
                        let finished = fresh.migration.is_none() && fresh.format >= FORMAT;
                        if finished || fresh.migration.as_ref().map(|m| m.by.clone()) != seen {
                            return Ok(Written::Unchanged(()));
                        }
                        fresh.format = FORMAT;
                        fresh.migration = Some(Migration {
                            by: writer.clone(),
                            since: now,
                        });
                        Ok(Written::Changed(()))
                    })
                    .await?;
                    continue;
                }
            }
            for rec in state.legacy_identities.values() {
                let name = ids::identity_object_name(rec.id);
                self.create_if_absent(ids::identity_configmap(rec, &self.writer)?, &name)
                    .await?;
                ids::lock(&self.identities).insert(rec.clone());
            }
            for rec in state.legacy_nodes.values() {
                let cm = nodes::node_configmap(None, rec, &self.writer)?;
                self.create_if_absent(cm, &nodes::node_object_name(&rec.name))
                    .await?;
                kube_index::Index::upsert(&mut *kube_index::lock(&self.nodes), rec.clone());
            }
            for (hash_hex, rec) in &state.legacy_tokens {
                let cm = nodes::token_configmap(None, hash_hex, rec, &self.writer)?;
                self.create_if_absent(cm, &nodes::token_object_name(hash_hex))
                    .await?;
            }
            let writer = self.writer.clone();
            let finished = self
                .update_state("format migration (finish)", |fresh| {
                    if fresh.migration.as_ref().is_none_or(|m| m.by != writer) {
                        // Taken over after this replica went quiet.
                        return Ok(Written::Unchanged(false));
                    }
                    fresh.migration = None;
                    fresh.legacy_identities.clear();
                    fresh.legacy_nodes.clear();
                    fresh.legacy_tokens.clear();
                    Ok(Written::Changed(true))
                })
                .await?;
            if finished {
                tracing::info!(
                    namespace = %self.namespace,
                    identities = state.legacy_identities.len(),
                    nodes = state.legacy_nodes.len(),
                    join_tokens = state.legacy_tokens.len(),
                    "migrated the shared state to format {FORMAT}: identities, nodes and join tokens \
                     are objects of their own, pods and policies are no longer copied"
                );
                return Ok(());
            }
        }
    }

    /// Raises the counters past every number an object holds, when a state
    /// restored from an old backup is behind them.
    async fn raise_counters(&self) -> StoreResult<()> {
        let top_identity = ids::lock(&self.identities)
            .all()
            .iter()
            .map(|i| u64::from(i.id) + 1)
            .max();
        let top_node = kube_index::lock(&self.nodes)
            .all()
            .iter()
            .map(|n| u64::from(n.node_id) + 1)
            .max();
        self.update_state("counters", |state| {
            let identity = state.next_identity.max(top_identity.unwrap_or(0));
            let node = state.next_node_id.max(top_node.unwrap_or(0));
            if (identity, node) == (state.next_identity, state.next_node_id) {
                return Ok(Written::Unchanged(()));
            }
            tracing::warn!(
                next_identity = identity,
                next_node_id = node,
                "the shared state's counters were behind the objects (restored from an old backup?); raised them"
            );
            state.next_identity = identity;
            state.next_node_id = node;
            Ok(Written::Changed(()))
        })
        .await
    }

    /// Creates `cm` unless an object of that name exists.
    async fn create_if_absent(&self, cm: ConfigMap, name: &str) -> StoreResult<()> {
        match self.configmaps.create(&PostParams::default(), &cm).await {
            Ok(_) => Ok(()),
            Err(e) if is_already_exists(&e) => Ok(()),
            Err(e) => Err(self.error(e, "create", "configmaps", name)),
        }
    }

    async fn get_configmap(&self, name: &str) -> StoreResult<Option<ConfigMap>> {
        self.configmaps
            .get_opt(name)
            .await
            .map_err(|e| self.error(e, "get", "configmaps", name))
    }

    /// The join token object for this hash, and the token it holds.
    async fn read_token(&self, hash_hex: &str) -> StoreResult<Option<(ConfigMap, JoinTokenRecord)>> {
        let Some(cm) = self.get_configmap(&nodes::token_object_name(hash_hex)).await? else {
            return Ok(None);
        };
        let token = nodes::token_record(&cm)?;
        Ok(Some((cm, token)))
    }

    /// Registers `node` ([`rules::register_node`]): a known node's object
    /// is rewritten by a conditional write; a new node takes a node id from
    /// the counter in `keyway-state` (written first, so a crash leaves an
    /// unused id, never an id given twice) and its object is created, which
    /// fails with AlreadyExists if another replica registered it meanwhile
    /// (then its record is updated instead, and the id taken is unused).
    async fn upsert_node(&self, node: &str, now: i64, registration: u32) -> StoreResult<NodeRecord> {
        let name = nodes::node_object_name(node);
        for attempt in 0..MAX_ATTEMPTS {
            let written = match self.get_configmap(&name).await? {
                Some(cm) => {
                    let known = nodes::node_record_of(&cm, node)?;
                    let (rec, _) = rules::register_node(Some(known), 0, node, now, registration)?;
                    let cm = nodes::node_configmap(Some(cm), &rec, &self.writer)?;
                    (
                        rec,
                        self.configmaps.replace(&name, &PostParams::default(), &cm).await,
                    )
                }
                None => {
                    self.refuse_revoked_registration(node, registration)?;
                    // Past every id in use, even if the counter is behind
                    // (a state restored from an old backup).
                    let floor = kube_index::lock(&self.nodes)
                        .all()
                        .iter()
                        .map(|n| u64::from(n.node_id) + 1)
                        .max()
                        .unwrap_or(0);
                    let rec = self
                        .update_state("node id", |state| {
                            let next_id = state.next_node_id.max(floor);
                            let (rec, next) = rules::register_node(None, next_id, node, now, registration)?;
                            state.next_node_id = next;
                            Ok(Written::Changed(rec))
                        })
                        .await?;
                    let cm = nodes::node_configmap(None, &rec, &self.writer)?;
                    (rec, self.configmaps.create(&PostParams::default(), &cm).await)
                }
            };
            match written {
                (rec, Ok(_)) => {
                    kube_index::Index::upsert(&mut *kube_index::lock(&self.nodes), rec.clone());
                    return Ok(rec);
                }
                (_, Err(e)) if is_conflict(&e) || is_already_exists(&e) || is_not_found(&e) => {
                    tracing::debug!(node, attempt, "the node's object changed underneath; retrying");
                    tokio::time::sleep(conflict_backoff(attempt)).await;
                }
                (_, Err(e)) => return Err(self.error(e, "write", "configmaps", &name)),
            }
        }
        Err(too_many_conflicts("node registration", &name, &self.namespace))
    }

    /// Refuses to create `node`'s record with `registration` when that
    /// registration was revoked: seen to go, or still known here although
    /// its object is gone (another replica revoked it and this one has not
    /// seen the delete yet). The caller, whose view lagged, signed an SVID
    /// with the revoked registration's tag, and recreating the record with
    /// it would make every SVID of that registration valid again. The node
    /// is dropped from the index and the view told, so the next attempt
    /// starts a new registration.
    fn refuse_revoked_registration(&self, node: &str, registration: u32) -> StoreResult<()> {
        let mut idx = kube_index::lock(&self.nodes);
        let stale = idx.get(node).is_some_and(|r| r.registration == registration);
        if stale || idx.was_revoked(node, registration) {
            idx.remove(node);
            drop(idx);
            self.changes.send_modify(|n| *n += 1);
            return Err(StoreError::backend(format!(
                "node {node} was revoked by another replica while it attested; attest again"
            )));
        }
        Ok(())
    }

    /// Before anything is written for an attestation of `node`: the same
    /// check as [`KubeStore::refuse_revoked_registration`], so a join token
    /// is not spent on an attestation that would be refused.
    async fn check_registration_current(&self, node: &str, registration: u32) -> StoreResult<()> {
        let (known, revoked) = {
            let idx = kube_index::lock(&self.nodes);
            (
                idx.get(node).is_some_and(|r| r.registration == registration),
                idx.was_revoked(node, registration),
            )
        };
        if revoked
            || (known
                && self
                    .get_configmap(&nodes::node_object_name(node))
                    .await?
                    .is_none())
        {
            return self.refuse_revoked_registration(node, registration);
        }
        Ok(())
    }

    /// Deletes the join tokens past their retention
    /// ([`rules::token_forgotten`]), at most every [`TOKEN_SWEEP_SECS`] of
    /// `now`. Best effort: what fails is swept next time.
    async fn sweep_tokens(&self, now: i64) {
        {
            let mut last = self.tokens_swept_at.locked();
            if last.is_some_and(|t| now >= t && now - t < TOKEN_SWEEP_SECS) {
                return;
            }
            *last = Some(now);
        }
        let params = ListParams::default().labels(&format!("{COMPONENT}={}", nodes::TOKEN_COMPONENT));
        let listed = match self.configmaps.list(&params).await {
            Ok(l) => l.items,
            Err(e) => {
                tracing::warn!(error = %self.error(e, "list", "configmaps", ""), "cannot sweep expired join tokens; trying later");
                return;
            }
        };
        for cm in listed {
            let forgotten = nodes::token_record(&cm).is_ok_and(|t| rules::token_forgotten(&t, now));
            let (Some(name), Some(version)) =
                (cm.metadata.name.as_deref(), cm.metadata.resource_version.clone())
            else {
                continue;
            };
            if !forgotten {
                continue;
            }
            // Only the version judged: a token written since stays.
            let params = DeleteParams {
                preconditions: Some(Preconditions {
                    resource_version: Some(version),
                    uid: None,
                }),
                ..Default::default()
            };
            match self.configmaps.delete(name, &params).await {
                Ok(_) => {}
                Err(e) if is_not_found(&e) || is_conflict(&e) => {}
                Err(e) => {
                    tracing::warn!(error = %self.error(e, "delete", "configmaps", name), "cannot delete an expired join token; trying later")
                }
            }
        }
    }

    fn allocator(&self) -> ids::Allocator<'_> {
        ids::Allocator {
            api: &self.configmaps,
            namespace: &self.namespace,
            writer: &self.writer,
            index: &self.identities,
        }
    }

    async fn read_state(&self) -> StoreResult<(ConfigMap, SharedState)> {
        let cm = self
            .configmaps
            .get_opt(STATE)
            .await
            .map_err(|e| self.error(e, "get", "configmaps", STATE))?
            .ok_or_else(|| self.state_missing())?;
        let state = SharedState::from_configmap(&cm)?;
        Ok((cm, state))
    }

    fn state_missing(&self) -> StoreError {
        StoreError::backend(format!(
            "ConfigMap {STATE} in namespace {} is gone although this control plane created it: \
             restore it from a backup (recreating it empty would hand out numeric identities again)",
            self.namespace
        ))
    }

    /// Applies `change` to the shared state and writes it back if it says
    /// so, re-reading and re-applying on conflicting writes (module docs).
    async fn update_state<R>(
        &self,
        what: &str,
        mut change: impl FnMut(&mut SharedState) -> StoreResult<Written<R>>,
    ) -> StoreResult<R> {
        let _one_writer = self.state_writer.lock().await;
        for attempt in 0..MAX_ATTEMPTS {
            let (mut cm, mut state) = self.read_state().await?;
            let result = match change(&mut state)? {
                Written::Unchanged(r) => return Ok(r),
                Written::Changed(r) => r,
            };
            set_state(&mut cm, &state, &self.writer)?;
            match self.configmaps.replace(STATE, &PostParams::default(), &cm).await {
                Ok(written) => {
                    self.own_writes.record(&written);
                    return Ok(result);
                }
                Err(e) if is_conflict(&e) => {
                    tracing::debug!(what, attempt, "the shared state changed underneath; retrying");
                    tokio::time::sleep(conflict_backoff(attempt)).await;
                }
                Err(e) if is_not_found(&e) => return Err(self.state_missing()),
                Err(e) => return Err(self.error(e, "update", "configmaps", STATE)),
            }
        }
        Err(too_many_conflicts(what, STATE, &self.namespace))
    }

    /// Every chunk of the issuance log, a few per page.
    async fn list_chunks(&self) -> StoreResult<Vec<ConfigMap>> {
        let mut params = ListParams::default()
            .labels(&format!("{COMPONENT}={ISSUANCE_COMPONENT}"))
            .limit(8);
        let mut chunks = Vec::new();
        loop {
            let page = self
                .configmaps
                .list(&params)
                .await
                .map_err(|e| self.error(e, "list", "configmaps", ""))?;
            chunks.extend(page.items);
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(token) => params = params.continue_token(&token),
                None => return Ok(chunks),
            }
        }
    }

    /// Hands records to the log writer and waits until they are written.
    async fn append_to_log(&self, records: Vec<IssuanceRecord>) -> StoreResult<()> {
        let gone = || StoreError::backend("the issuance log writer has stopped");
        let (done, result) = oneshot::channel();
        self.log
            .send(LogRequest { records, done })
            .await
            .map_err(|_| gone())?;
        result.await.map_err(|_| gone())?
    }

    /// Moves node SVIDs recorded in `pending_issuance` to the log. Best
    /// effort: what fails stays pending and is moved next time.
    async fn drain_pending(&self) {
        let _one_drain = self.drain_lock.lock().await;
        let pending: Vec<IssuanceRecord> = match self.read_state().await {
            Ok((_, state)) => state.pending_issuance.into_values().collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read pending node SVID records; moving them later");
                return;
            }
        };
        if pending.is_empty() {
            return;
        }
        let serials: Vec<String> = pending.iter().map(|r| r.serial.clone()).collect();
        if let Err(e) = self.append_to_log(pending).await {
            tracing::warn!(error = %e, "cannot move node SVID records to the issuance log; moving them later");
            return;
        }
        let removed = self
            .update_state("pending issuance", |state| {
                let before = state.pending_issuance.len();
                for serial in &serials {
                    state.pending_issuance.remove(serial);
                }
                Ok(if state.pending_issuance.len() == before {
                    Written::Unchanged(())
                } else {
                    Written::Changed(())
                })
            })
            .await;
        if let Err(e) = removed {
            // Harmless: the records are in the log, and readers merge by serial.
            tracing::warn!(error = %e, "node SVID records reached the log but stay pending");
        }
    }

    fn error(&self, e: kube::Error, verb: &str, resource: &str, name: &str) -> StoreError {
        api_error(e, verb, resource, name, &self.namespace)
    }

    fn set_ca_seen(&self, seen: CaSeen) {
        *self.ca_seen.locked() = seen;
    }

    /// `ca.json` and this writer's annotation, into `secret` (new or read).
    fn fill_ca_secret(&self, secret: &mut KubeSecret, state: &CaState) -> StoreResult<()> {
        let json = serde_json::to_vec(state)
            .map_err(|e| StoreError::backend_from(format!("cannot encode the CA state: {e}"), e))?;
        secret
            .metadata
            .annotations
            .get_or_insert_default()
            .insert(LAST_WRITER.into(), self.writer.clone());
        secret.type_ = Some("Opaque".into());
        secret.data = Some(BTreeMap::from([(CA_KEY.to_owned(), ByteString(json))]));
        Ok(())
    }

    fn ca_changed_elsewhere(&self) -> StoreError {
        StoreError::backend(format!(
            "another replica changed the CA (Secret {CA} in namespace {}) since this one read it; \
             the change was not saved: reload the CA state and retry",
            self.namespace
        ))
    }

    /// The compare-and-swap of `save_ca` (module docs). Reading the Secret
    /// first keeps metadata others added (labels, backup annotations).
    async fn write_ca(&self, state: &CaState, seen: CaSeen) -> StoreResult<KubeSecret> {
        let current = self
            .secrets
            .get_opt(CA)
            .await
            .map_err(|e| self.error(e, "get", "secrets", CA))?;
        let Some(mut secret) = current else {
            if let CaSeen::At(_) = seen {
                return Err(StoreError::backend(format!(
                    "Secret {CA} in namespace {} was deleted since this replica read it; restore it \
                     from a backup, or restart the control plane to create a new CA",
                    self.namespace
                )));
            }
            let mut secret = KubeSecret {
                metadata: object_meta(CA, "ca"),
                ..Default::default()
            };
            self.fill_ca_secret(&mut secret, state)?;
            return match self.secrets.create(&PostParams::default(), &secret).await {
                Ok(created) => Ok(created),
                Err(e) if is_already_exists(&e) => Err(StoreError::backend(format!(
                    "another replica created the CA (Secret {CA} in namespace {}) while this one \
                     was creating its own; restart this replica to load theirs",
                    self.namespace
                ))),
                Err(e) => Err(self.error(e, "create", "secrets", CA)),
            };
        };
        match seen {
            CaSeen::Absent => {
                return Err(StoreError::backend(format!(
                    "another replica created the CA (Secret {CA} in namespace {}) while this one \
                     was creating its own; restart this replica to load theirs",
                    self.namespace
                )));
            }
            CaSeen::At(version) if secret.metadata.resource_version.as_ref() != Some(&version) => {
                return Err(self.ca_changed_elsewhere());
            }
            _ => {}
        }
        self.fill_ca_secret(&mut secret, state)?;
        match self.secrets.replace(CA, &PostParams::default(), &secret).await {
            Ok(written) => Ok(written),
            Err(e) if is_conflict(&e) => Err(self.ca_changed_elsewhere()),
            Err(e) => Err(self.error(e, "update", "secrets", CA)),
        }
    }
}

#[async_trait::async_trait]
impl Store for KubeStore {
    async fn load_ca(&self) -> StoreResult<Option<CaState>> {
        let Some(secret) = self
            .secrets
            .get_opt(CA)
            .await
            .map_err(|e| self.error(e, "get", "secrets", CA))?
        else {
            self.set_ca_seen(CaSeen::Absent);
            return Ok(None);
        };
        let what = || format!("Secret {CA} key {CA_KEY} in namespace {}", self.namespace);
        let raw = secret
            .data
            .as_ref()
            .and_then(|d| d.get(CA_KEY))
            .ok_or_else(|| StoreError::Corrupt {
                what: what(),
                reason: "the key is missing".into(),
            })?;
        let state = serde_json::from_slice(&raw.0).map_err(|e| StoreError::Corrupt {
            what: what(),
            // serde_json's message names a position, never the content.
            reason: e.to_string(),
        })?;
        self.set_ca_seen(version_of(&secret));
        Ok(Some(state))
    }

    async fn save_ca(&self, state: &CaState) -> StoreResult<()> {
        let seen = self.ca_seen.locked().clone();
        let written = self.write_ca(state, seen).await?;
        self.own_writes.record(&written);
        self.set_ca_seen(version_of(&written));
        Ok(())
    }

    async fn put_join_token(&self, token_hash: &[u8], record: &JoinTokenRecord) -> StoreResult<()> {
        let hash_hex = hex(token_hash);
        let name = nodes::token_object_name(&hash_hex);
        let cm = nodes::token_configmap(None, &hash_hex, record, &self.writer)?;
        match self.configmaps.create(&PostParams::default(), &cm).await {
            Ok(_) => {}
            // 256 random bits do not collide: this is the same token again.
            Err(e) if is_already_exists(&e) => {
                return Err(StoreError::backend(format!(
                    "a join token with this hash is stored already (ConfigMap {name}); create a new token"
                )));
            }
            Err(e) => return Err(self.error(e, "create", "configmaps", &name)),
        }
        self.sweep_tokens(record.created_at).await;
        Ok(())
    }

    async fn join_token(&self, token_hash: &[u8]) -> StoreResult<Option<JoinTokenRecord>> {
        Ok(self.read_token(&hex(token_hash)).await?.map(|(_, t)| t))
    }

    async fn consume_join_token(
        &self,
        token_hash: &[u8],
        node: &str,
        now: i64,
        registration: u32,
        issued: &IssuanceRecord,
    ) -> StoreResult<NodeRecord> {
        check_serial(&issued.serial)?;
        let hash_hex = hex(token_hash);
        let name = nodes::token_object_name(&hash_hex);
        // 1. Refused tokens stop here, before anything is written.
        let mut read = self.read_token(&hash_hex).await?;
        if let Some(problem) = rules::token_problem(read.as_ref().map(|(_, t)| t), node, now) {
            return Err(StoreError::TokenRefused(problem));
        }
        self.check_registration_current(node, registration).await?;
        // 2. The node SVID is logged before the token is spent, so every
        // SVID an agent receives is in the log (one whose attestation then
        // fails stays logged as issued, never handed out).
        self.append_to_log(vec![issued.clone()]).await?;
        // 3. The token is consumed by a conditional write: of two replicas
        // racing with one token, exactly one succeeds.
        let mut attempt = 0;
        loop {
            let (cm, token) = read.ok_or(StoreError::TokenRefused(TokenProblem::Unknown))?;
            let used = rules::consume_token(Some(token), node, now)?;
            let cm = nodes::token_configmap(Some(cm), &hash_hex, &used, &self.writer)?;
            match self.configmaps.replace(&name, &PostParams::default(), &cm).await {
                Ok(_) => break,
                Err(e) if is_conflict(&e) && attempt + 1 < MAX_ATTEMPTS => {
                    tokio::time::sleep(conflict_backoff(attempt)).await;
                    attempt += 1;
                    read = self.read_token(&hash_hex).await?;
                }
                Err(e) if is_not_found(&e) => return Err(StoreError::TokenRefused(TokenProblem::Unknown)),
                Err(e) if is_conflict(&e) => {
                    return Err(too_many_conflicts("join token", &name, &self.namespace));
                }
                Err(e) => return Err(self.error(e, "update", "configmaps", &name)),
            }
        }
        // 4. The node record. A failure here leaves the token spent and the
        // node unregistered: the attestation fails and a new token is needed.
        self.upsert_node(node, now, registration).await
    }

    async fn register_node(
        &self,
        node: &str,
        now: i64,
        registration: u32,
        issued: &IssuanceRecord,
    ) -> StoreResult<NodeRecord> {
        check_serial(&issued.serial)?;
        self.check_registration_current(node, registration).await?;
        self.append_to_log(vec![issued.clone()]).await?;
        self.upsert_node(node, now, registration).await
    }

    async fn log_issuance(&self, record: &IssuanceRecord) -> StoreResult<()> {
        check_serial(&record.serial)?;
        self.append_to_log(vec![record.clone()]).await
    }

    async fn issuance_log(&self) -> StoreResult<Vec<IssuanceRecord>> {
        // Pending first: a record leaves pending only after it reached a
        // chunk, so reading in this order cannot miss one that moves meanwhile.
        let (_, state) = self.read_state().await?;
        let mut log = state.pending_issuance;
        for chunk in self.list_chunks().await? {
            let name = chunk.metadata.name.as_deref().unwrap_or(CHUNK_PREFIX);
            for (serial, raw) in chunk.data.iter().flatten() {
                log.insert(serial.clone(), parse_record(name, serial, raw)?);
            }
        }
        Ok(log.into_values().collect())
    }

    async fn prune_issuance(&self, keep: &IssuanceRetention, now: i64) -> StoreResult<PruneOutcome> {
        // Whole chunks go, never the newest (the one being appended to): a
        // chunk once every certificate in it is past the window, then the
        // oldest while the log is over its caps. A chunk mostly past the
        // window but held by a few long-lived certificates (node SVIDs, the
        // control plane's own) is compacted: those records are appended to
        // the newest chunk, then the chunk goes.
        struct Chunk {
            index: u64,
            name: String,
            version: Option<String>,
            records: usize,
            bytes: usize,
            last_expiry: i64,
            /// The records still within the window (all of them readable).
            live: Vec<IssuanceRecord>,
        }
        let cutoff = keep.cutoff(now);
        let mut chunks = Vec::new();
        let mut unreadable = 0;
        for cm in self.list_chunks().await? {
            let Some(name) = cm.metadata.name.clone() else {
                continue;
            };
            let Some(index) = name
                .strip_prefix(CHUNK_PREFIX)
                .and_then(|i| i.parse::<u64>().ok())
            else {
                continue;
            };
            let data = cm.data.unwrap_or_default();
            // A chunk with a record that cannot be read is never judged
            // expired (only the caps can take it).
            let mut last_expiry = i64::MIN;
            let mut live = Vec::new();
            for (serial, raw) in &data {
                last_expiry = match parse_record(&name, serial, raw) {
                    Ok(r) => {
                        let expiry = last_expiry.max(r.not_after);
                        if r.not_after >= cutoff {
                            live.push(r);
                        }
                        expiry
                    }
                    Err(_) => {
                        unreadable += 1;
                        i64::MAX
                    }
                };
            }
            chunks.push(Chunk {
                index,
                name,
                version: cm.metadata.resource_version,
                records: data.len(),
                bytes: data.iter().map(|(k, v)| entry_size(k, v)).sum(),
                last_expiry,
                live,
            });
        }
        chunks.sort_by_key(|c| c.index);
        let mut kept = chunks.iter().map(|c| c.records).sum::<usize>();
        let mut kept_bytes = chunks.iter().map(|c| c.bytes).sum::<usize>();
        let older = chunks.len().saturating_sub(1);
        let mut doomed = vec![false; chunks.len()];
        for (i, c) in chunks[..older].iter().enumerate() {
            if c.last_expiry < cutoff {
                doomed[i] = true;
                kept -= c.records;
                kept_bytes -= c.bytes;
            }
        }
        for (i, c) in chunks[..older].iter().enumerate() {
            if kept <= keep.max_records && kept_bytes <= keep.max_bytes {
                break;
            }
            if !doomed[i] {
                doomed[i] = true;
                kept -= c.records;
                kept_bytes -= c.bytes;
            }
        }
        // Compaction: an older chunk whose live records are at most a
        // quarter of it (and none unreadable) hands them on, then goes.
        let mut moved = 0;
        let mut compacted = vec![false; chunks.len()];
        let candidates: Vec<usize> = (0..older)
            .filter(|&i| {
                let c = &chunks[i];
                !doomed[i] && c.last_expiry != i64::MAX && c.live.len() * 4 <= c.records
            })
            .collect();
        if !candidates.is_empty() {
            // Appended first: a crash between the two leaves a record in two
            // chunks, which readers merge by serial.
            for &i in &candidates {
                self.append_to_log(chunks[i].live.clone()).await?;
            }
            // The writer skips serials its head chunk already holds: if its
            // head was the chunk being compacted (a replica that has not
            // logged since), nothing moved. Delete only what is now also
            // held elsewhere.
            let mut held_in: HashMap<String, Vec<String>> = HashMap::new();
            for cm in self.list_chunks().await? {
                let name = cm.metadata.name.clone().unwrap_or_default();
                for serial in cm.data.unwrap_or_default().into_keys() {
                    held_in.entry(serial).or_default().push(name.clone());
                }
            }
            for i in candidates {
                let c = &chunks[i];
                let elsewhere = c.live.iter().all(|r| {
                    held_in
                        .get(&r.serial)
                        .is_some_and(|names| names.iter().any(|n| *n != c.name))
                });
                if !elsewhere {
                    tracing::warn!(chunk = %c.name, "issuance records did not move on; chunk kept for now");
                    continue;
                }
                doomed[i] = true;
                compacted[i] = true;
                moved += c.live.len();
                kept -= c.records;
                kept_bytes -= c.bytes;
            }
        }
        let mut removed = 0;
        for ((c, _), moved_on) in chunks
            .iter()
            .zip(&doomed)
            .zip(&compacted)
            .filter(|((_, d), _)| **d)
        {
            // Only the version that was judged: a chunk someone appended to
            // since (a replica that had not seen a newer one) stays.
            let params = DeleteParams {
                preconditions: Some(Preconditions {
                    resource_version: c.version.clone(),
                    uid: None,
                }),
                ..DeleteParams::default()
            };
            match self.configmaps.delete(&c.name, &params).await {
                Ok(_) => {
                    let moved_on = if *moved_on { c.live.len() } else { 0 };
                    removed += c.records - moved_on;
                    tracing::info!(
                        chunk = %c.name,
                        records = c.records,
                        moved_on,
                        "issuance log chunk pruned"
                    );
                }
                // Appended to since it was judged: it stays.
                Err(e) if is_conflict(&e) => {
                    kept += c.records;
                    kept_bytes += c.bytes;
                }
                // Pruned meanwhile by another replica.
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(self.error(e, "delete", "configmaps", &c.name)),
            }
        }
        Ok(PruneOutcome {
            removed,
            kept: kept + moved,
            kept_bytes,
            unreadable,
        })
    }

    async fn apply(
        &self,
        _workloads: Vec<WorkloadRecord>,
        _policies: Vec<PolicyRecord>,
    ) -> StoreResult<ApplyOutcome> {
        Err(no_documents())
    }

    async fn delete(&self, _refs: Vec<DocumentRef>) -> StoreResult<ApplyOutcome> {
        Err(no_documents())
    }

    async fn set_node_addresses(&self, node: &str, addresses: Vec<String>) -> StoreResult<Option<bool>> {
        // Agents re-advertise on every Sync: an unchanged list costs no call.
        if kube_index::lock(&self.nodes)
            .get(node)
            .is_some_and(|rec| rec.addresses == addresses)
        {
            return Ok(Some(false));
        }
        let name = nodes::node_object_name(node);
        for attempt in 0..MAX_ATTEMPTS {
            let Some(cm) = self.get_configmap(&name).await? else {
                return Ok(None);
            };
            let mut rec = nodes::node_record_of(&cm, node)?;
            if !rules::set_node_addresses(&mut rec, &addresses) {
                kube_index::Index::upsert(&mut *kube_index::lock(&self.nodes), rec);
                return Ok(Some(false));
            }
            let cm = nodes::node_configmap(Some(cm), &rec, &self.writer)?;
            match self.configmaps.replace(&name, &PostParams::default(), &cm).await {
                Ok(_) => {
                    kube_index::Index::upsert(&mut *kube_index::lock(&self.nodes), rec);
                    return Ok(Some(true));
                }
                Err(e) if is_conflict(&e) => tokio::time::sleep(conflict_backoff(attempt)).await,
                Err(e) if is_not_found(&e) => return Ok(None),
                Err(e) => return Err(self.error(e, "update", "configmaps", &name)),
            }
        }
        Err(too_many_conflicts("node addresses", &name, &self.namespace))
    }

    async fn allocate_identities(&self, wanted: &[IdentityRecord]) -> StoreResult<Vec<IdentityRecord>> {
        self.allocator()
            .allocate(wanted, |n| {
                self.update_state("identity numbers", move |state| {
                    let (block, next) = rules::reserve_identities(state.next_identity, n)?;
                    state.next_identity = next;
                    Ok(Written::Changed(block))
                })
            })
            .await
    }

    async fn forget_identities(&self, ids: &[u32]) -> StoreResult<usize> {
        self.allocator().forget(ids).await
    }

    async fn revoke_node(&self, node: &str) -> StoreResult<bool> {
        let name = nodes::node_object_name(node);
        let existed = match self.configmaps.delete(&name, &DeleteParams::default()).await {
            Ok(_) => true,
            Err(e) if is_not_found(&e) => false,
            Err(e) => return Err(self.error(e, "delete", "configmaps", &name)),
        };
        kube_index::lock(&self.nodes).remove(node);
        Ok(existed)
    }

    async fn registry(&self) -> StoreResult<RegistrySnapshot> {
        // Both from the watched indexes: no API call.
        let identities = ids::lock(&self.identities).all();
        let (revision, nodes) = {
            let idx = kube_index::lock(&self.nodes);
            (idx.revision(), idx.all())
        };
        Ok(RegistrySnapshot {
            revision,
            workloads: Vec::new(),
            identities,
            nodes,
            policies: Vec::new(),
        })
    }

    fn subscribe_changes(&self) -> Option<watch::Receiver<u64>> {
        Some(self.changes.subscribe())
    }
}

fn no_documents() -> StoreError {
    StoreError::backend(
        "the Kubernetes store keeps no workloads or policies: the API server holds the Pods and \
         policies, and the control plane reads them from its watch cache",
    )
}

/// Whether a change needs a write.
enum Written<R> {
    Changed(R),
    Unchanged(R),
}

/// Everything in `state.json`: the counters. No `Debug`: a format-2 state
/// holds join token hashes.
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(default)]
struct SharedState {
    format: u32,
    /// The next numeric identity to hand out (below FIRST_USER: FIRST_USER).
    next_identity: u64,
    /// The next node id to hand out (0: 1).
    next_node_id: u64,
    /// Formats 1 and 2 only (read to migrate them to objects; never written).
    #[serde(rename = "identities", skip_serializing_if = "BTreeMap::is_empty")]
    legacy_identities: BTreeMap<u32, IdentityRecord>,
    #[serde(rename = "nodes", skip_serializing_if = "BTreeMap::is_empty")]
    legacy_nodes: BTreeMap<String, NodeRecord>,
    /// By hex SHA-256 of the token.
    #[serde(rename = "join_tokens", skip_serializing_if = "BTreeMap::is_empty")]
    legacy_tokens: BTreeMap<String, JoinTokenRecord>,
    /// Set while a migration from an earlier format is under way.
    #[serde(skip_serializing_if = "Option::is_none")]
    migration: Option<Migration>,
    /// Node SVIDs a format-2 replica recorded with their attestation and
    /// had not moved to the log yet, by serial (moved on open).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pending_issuance: BTreeMap<String, IssuanceRecord>,
}

impl SharedState {
    fn new() -> Self {
        Self {
            format: FORMAT,
            next_identity: rules::first_identity(),
            next_node_id: rules::FIRST_NODE_ID,
            ..Default::default()
        }
    }

    fn from_configmap(cm: &ConfigMap) -> StoreResult<Self> {
        let what = || format!("ConfigMap {STATE} key {STATE_KEY}");
        let raw = cm
            .data
            .as_ref()
            .and_then(|d| d.get(STATE_KEY))
            .ok_or_else(|| StoreError::Corrupt {
                what: what(),
                reason: "the key is missing".into(),
            })?;
        Self::decode(raw).map_err(|reason| StoreError::Corrupt { what: what(), reason })?
    }

    /// The outer error is a decoding failure; the inner one a format this
    /// replica does not know.
    fn decode(raw: &str) -> Result<StoreResult<Self>, String> {
        let state: Self = serde_json::from_str(raw).map_err(|e| e.to_string())?;
        if state.format > FORMAT {
            return Ok(Err(StoreError::backend(format!(
                "ConfigMap {STATE} was written in format {} by a newer Keyway; this replica knows \
                 format {FORMAT}: upgrade it",
                state.format
            ))));
        }
        Ok(Ok(state))
    }

    /// `state.json`, refused when it would not fit a ConfigMap (only a
    /// state not yet migrated can be that large).
    fn encode(&self) -> StoreResult<String> {
        let json = serde_json::to_string(self)
            .map_err(|e| StoreError::backend_from(format!("cannot encode the shared state: {e}"), e))?;
        if json.len() > STATE_LIMIT {
            return Err(StoreError::Exhausted(format!(
                "the shared state would take {} KiB, more than the {} KiB a ConfigMap can hold \
                 (Kubernetes caps objects at 1 MiB): {} nodes, {} join tokens and {} pending records \
                 not yet migrated to objects of their own",
                json.len() / 1024,
                STATE_LIMIT / 1024,
                self.legacy_nodes.len(),
                self.legacy_tokens.len(),
                self.pending_issuance.len(),
            )));
        }
        Ok(json)
    }
}

/// Writes `state` into `cm` with this writer's annotations.
fn set_state(cm: &mut ConfigMap, state: &SharedState, writer: &str) -> StoreResult<()> {
    let json = state.encode()?;
    cm.data = Some(BTreeMap::from([(STATE_KEY.to_owned(), json)]));
    let annotations = cm.metadata.annotations.get_or_insert_default();
    annotations.insert(LAST_WRITER.into(), writer.to_owned());
    Ok(())
}

fn version_of(secret: &KubeSecret) -> CaSeen {
    match &secret.metadata.resource_version {
        Some(v) => CaSeen::At(v.clone()),
        None => CaSeen::Unknown,
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Serials become ConfigMap keys in the log.
fn check_serial(serial: &str) -> StoreResult<()> {
    let valid = !serial.is_empty()
        && serial.len() <= 253
        && serial
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if valid {
        Ok(())
    } else {
        Err(StoreError::backend(format!(
            "certificate serial {serial:?} cannot be an issuance log key: expected 1 to 253 \
             characters of [-._a-zA-Z0-9]"
        )))
    }
}

// ---- the issuance log -------------------------------------------------------

struct LogRequest {
    records: Vec<IssuanceRecord>,
    done: oneshot::Sender<StoreResult<()>>,
}

/// The log writer's view of the chunks; owned by its task.
struct IssuanceLog {
    api: Api<ConfigMap>,
    namespace: String,
    writer: String,
    /// The newest chunk this process knows of.
    head_index: u64,
    /// That chunk as last read or written; dropped on any doubt.
    head: Option<ConfigMap>,
}

fn chunk_name(index: u64) -> String {
    format!("{CHUNK_PREFIX}{index}")
}

/// The highest chunk index in the namespace (0 when there is none yet).
async fn newest_chunk(api: &Api<ConfigMap>, namespace: &str) -> StoreResult<u64> {
    let params = ListParams::default().labels(&format!("{COMPONENT}={ISSUANCE_COMPONENT}"));
    let chunks = api
        .list_metadata(&params)
        .await
        .map_err(|e| api_error(e, "list", "configmaps", "", namespace))?;
    Ok(chunks
        .items
        .iter()
        .filter_map(|c| {
            c.metadata
                .name
                .as_deref()?
                .strip_prefix(CHUNK_PREFIX)?
                .parse()
                .ok()
        })
        .max()
        .unwrap_or(0))
}

fn parse_record(chunk: &str, serial: &str, raw: &str) -> StoreResult<IssuanceRecord> {
    serde_json::from_str(raw).map_err(|e| StoreError::Corrupt {
        what: format!("issuance record {serial} in ConfigMap {chunk}"),
        reason: e.to_string(),
    })
}

/// Bytes a record adds to a chunk.
fn entry_size(serial: &str, json: &str) -> usize {
    serial.len() + json.len()
}

impl IssuanceLog {
    /// Serves append requests until every sender is gone, writing all that
    /// queued up meanwhile in one go (group commit).
    async fn run(mut self, mut queue: mpsc::Receiver<LogRequest>) {
        while let Some(first) = queue.recv().await {
            let mut batch = vec![first];
            let mut count = batch[0].records.len();
            while count < MAX_BATCH {
                let Ok(next) = queue.try_recv() else { break };
                count += next.records.len();
                batch.push(next);
            }
            let records = batch.iter().flat_map(|r| r.records.iter().cloned()).collect();
            let result = self.append(records).await;
            if let Err(e) = &result {
                tracing::warn!(error = %e, records = count, "cannot write to the issuance log");
            }
            for request in batch {
                let _ = request
                    .done
                    .send(result.as_ref().map(|_| ()).map_err(clone_error));
            }
        }
    }

    async fn append(&mut self, records: Vec<IssuanceRecord>) -> StoreResult<()> {
        let mut todo: BTreeMap<String, String> = BTreeMap::new();
        for r in records {
            let json = serde_json::to_string(&r)
                .map_err(|e| StoreError::backend_from(format!("cannot encode an issuance record: {e}"), e))?;
            todo.insert(r.serial, json);
        }
        let mut conflicts = 0;
        while !todo.is_empty() {
            let mut head = match self.head.take() {
                Some(head) => head,
                None => self.load_head().await?,
            };
            let name = chunk_name(self.head_index);
            let data = head.data.get_or_insert_default();
            // Already there: written by an earlier attempt.
            todo.retain(|serial, _| !data.contains_key(serial));
            if todo.is_empty() {
                self.head = Some(head);
                break;
            }
            let (taken, _) = fit(data, &todo);
            if taken.is_empty() {
                if data.is_empty() {
                    return Err(StoreError::backend(format!(
                        "an issuance record does not fit an empty log chunk of {CHUNK_LIMIT} bytes"
                    )));
                }
                self.head_index += 1;
                continue;
            }
            for serial in &taken {
                if let Some(json) = todo.get(serial) {
                    data.insert(serial.clone(), json.clone());
                }
            }
            head.metadata
                .annotations
                .get_or_insert_default()
                .insert(LAST_WRITER.into(), self.writer.clone());
            match self.api.replace(&name, &PostParams::default(), &head).await {
                Ok(written) => {
                    self.head = Some(written);
                    for serial in &taken {
                        todo.remove(serial);
                    }
                }
                Err(e) if is_conflict(&e) => {
                    conflicts += 1;
                    if conflicts >= MAX_ATTEMPTS {
                        return Err(too_many_conflicts("the issuance log", &name, &self.namespace));
                    }
                    tokio::time::sleep(conflict_backoff(conflicts)).await;
                }
                Err(e) if is_not_found(&e) => {
                    // Pruned: another replica had rolled over to a newer
                    // chunk, and this one aged out. Move to the newest.
                    let newest = newest_chunk(&self.api, &self.namespace).await?;
                    if newest <= self.head_index {
                        return Err(StoreError::backend(format!(
                            "issuance log chunk {name} in namespace {} was deleted while in use \
                             (only older chunks are ever pruned)",
                            self.namespace
                        )));
                    }
                    self.head_index = newest;
                }
                Err(e) => return Err(api_error(e, "update", "configmaps", &name, &self.namespace)),
            }
        }
        Ok(())
    }

    /// Reads the head chunk, creating it when it does not exist yet (unless
    /// a newer one does: then this one was pruned, and the newest is the head).
    async fn load_head(&mut self) -> StoreResult<ConfigMap> {
        let name = chunk_name(self.head_index);
        let fail = |e, verb| api_error(e, verb, "configmaps", &name, &self.namespace);
        if let Some(cm) = self.api.get_opt(&name).await.map_err(|e| fail(e, "get"))? {
            return Ok(cm);
        }
        let newest = newest_chunk(&self.api, &self.namespace).await?;
        if newest > self.head_index {
            self.head_index = newest;
            return Box::pin(self.load_head()).await;
        }
        let mut cm = ConfigMap {
            metadata: object_meta(&name, ISSUANCE_COMPONENT),
            data: Some(BTreeMap::new()),
            ..Default::default()
        };
        cm.metadata
            .annotations
            .get_or_insert_default()
            .insert(LAST_WRITER.into(), self.writer.clone());
        match self.api.create(&PostParams::default(), &cm).await {
            Ok(created) => {
                tracing::info!(chunk = %name, "started an issuance log chunk");
                Ok(created)
            }
            // Another replica rolled over first.
            Err(e) if is_already_exists(&e) => self.api.get(&name).await.map_err(|e| fail(e, "get")),
            Err(e) => Err(fail(e, "create")),
        }
    }
}

/// The serials (in order) that fit in a chunk holding `data`, and its size after.
fn fit(data: &BTreeMap<String, String>, todo: &BTreeMap<String, String>) -> (Vec<String>, usize) {
    let mut size: usize = data.iter().map(|(k, v)| entry_size(k, v)).sum();
    let mut taken = Vec::new();
    for (serial, json) in todo {
        let add = entry_size(serial, json);
        if size + add > CHUNK_LIMIT {
            break;
        }
        size += add;
        taken.push(serial.clone());
    }
    (taken, size)
}

// ---- changes made by other replicas ----------------------------------------

/// Resource versions this process wrote, most recent last.
#[derive(Debug, Default)]
struct OwnWrites(Mutex<VecDeque<String>>);

impl OwnWrites {
    fn record<K: kube::Resource>(&self, written: &K) {
        let Some(version) = written.meta().resource_version.clone() else {
            return;
        };
        let mut versions = self.0.locked();
        if versions.len() == OWN_WRITES_REMEMBERED {
            versions.pop_front();
        }
        versions.push_back(version);
    }

    fn contains(&self, version: &str) -> bool {
        self.0.locked().iter().any(|v| v == version)
    }
}

/// One watch event, reduced to what the change signal needs.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    /// The object exists at this resourceVersion.
    Present(Option<String>),
    Deleted,
    /// A re-list begins; objects it does not list are gone.
    RelistStart,
    RelistDone,
}

fn seen<K>(event: watcher::Event<PartialObjectMeta<K>>) -> Seen {
    match event {
        watcher::Event::Apply(o) | watcher::Event::InitApply(o) => Seen::Present(o.metadata.resource_version),
        watcher::Event::Delete(_) => Seen::Deleted,
        watcher::Event::Init => Seen::RelistStart,
        watcher::Event::InitDone => Seen::RelistDone,
    }
}

/// Decides, per watched object, which events are changes by someone else.
#[derive(Debug, Default)]
struct ChangeTracker {
    /// The version last seen (written, read at start, or watched).
    version: Option<String>,
    /// Whether the current re-list has listed the object.
    listed: bool,
}

impl ChangeTracker {
    /// True when the event shows a version this process did not write and
    /// had not seen, or the object's deletion.
    fn observe(&mut self, event: Seen, own: impl Fn(&str) -> bool) -> bool {
        match event {
            Seen::Present(version) => {
                self.listed = true;
                if version.is_none() || version == self.version {
                    return false;
                }
                let foreign = version.as_deref().is_some_and(|v| !own(v));
                self.version = version;
                foreign
            }
            Seen::Deleted => self.version.take().is_some(),
            Seen::RelistStart => {
                self.listed = false;
                false
            }
            Seen::RelistDone => !self.listed && self.version.take().is_some(),
        }
    }
}

/// Bumps `changes` whenever the state ConfigMap or the CA Secret changes
/// underneath this process. Runs until aborted (the store's drop).
async fn watch_shared(
    configmaps: Api<PartialObjectMeta<ConfigMap>>,
    secrets: Api<PartialObjectMeta<KubeSecret>>,
    own: Arc<OwnWrites>,
    versions: [Option<String>; 2],
    changes: watch::Sender<u64>,
) {
    const OBJECTS: [&str; 2] = [STATE, CA];
    let by_name = |name: &str| watcher::Config::default().fields(&format!("metadata.name={name}"));
    let state = watcher(configmaps, by_name(STATE))
        .default_backoff()
        .map(|e| (0, e.map(seen)));
    let ca = watcher(secrets, by_name(CA))
        .default_backoff()
        .map(|e| (1, e.map(seen)));
    let mut events = std::pin::pin!(futures::stream::select(state, ca));
    let [state_version, ca_version] = versions;
    let mut trackers = [
        ChangeTracker {
            version: state_version,
            listed: false,
        },
        ChangeTracker {
            version: ca_version,
            listed: false,
        },
    ];
    let mut failing = false;
    while let Some((i, event)) = events.next().await {
        match event {
            Ok(event) => {
                if failing {
                    tracing::info!("watching the shared state again");
                    failing = false;
                }
                if trackers[i].observe(event, |v| own.contains(v)) {
                    tracing::debug!(object = OBJECTS[i], "shared state changed by another replica");
                    changes.send_modify(|n| *n += 1);
                }
            }
            Err(e) if !failing => {
                tracing::warn!(object = OBJECTS[i], error = %e, "watch on the shared state failed; retrying with backoff");
                failing = true;
            }
            Err(e) => {
                tracing::debug!(object = OBJECTS[i], error = %e, "watch on the shared state still failing")
            }
        }
    }
}

// ---- errors -----------------------------------------------------------------

fn too_many_conflicts(what: &str, object: &str, namespace: &str) -> StoreError {
    StoreError::backend(format!(
        "gave up writing {what}: ConfigMap {object} in namespace {namespace} changed underneath \
         {MAX_ATTEMPTS} times in a row; other replicas are writing heavily, retry"
    ))
}

fn clone_error(e: &StoreError) -> StoreError {
    match e {
        StoreError::Backend { message, .. } => StoreError::backend(message.clone()),
        StoreError::Corrupt { what, reason } => StoreError::Corrupt {
            what: what.clone(),
            reason: reason.clone(),
        },
        StoreError::TokenRefused(p) => StoreError::TokenRefused(*p),
        StoreError::Exhausted(m) => StoreError::Exhausted(m.clone()),
    }
}

/// Jittered exponential wait after a conflicting write, so two replicas
/// that collided do not collide again in lockstep.
fn conflict_backoff(attempt: u32) -> Duration {
    keyway_identity::jitter::between(Duration::from_millis(10 << attempt.min(6)), 0.5, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The state after a JSON round trip, as the next replica reads it.
    fn reread(state: &SharedState) -> SharedState {
        SharedState::decode(&state.encode().unwrap()).unwrap().unwrap()
    }

    #[test]
    fn the_state_holds_counters_only_and_stays_small() {
        let mut state = SharedState::new();
        state.next_identity = 1_000_000;
        state.next_node_id = 60_000;
        let json = state.encode().unwrap();
        assert!(json.len() < 200, "{json}");
        let again = reread(&state);
        assert_eq!((again.next_identity, again.next_node_id), (1_000_000, 60_000));
    }

    #[test]
    fn a_state_not_yet_migrated_over_the_configmap_limit_is_refused_with_what_it_holds() {
        let mut state = SharedState::new();
        for i in 0..10_000u32 {
            let name = format!("ip-10-0-{}-{}.eu-west-1.compute.internal", i / 250, i % 250);
            let (rec, _) =
                rules::register_node(None, u64::from(i % 60_000) + 1, &name, 1_700_000_000, 1).unwrap();
            state.legacy_nodes.insert(name, rec);
        }
        match state.encode() {
            Err(StoreError::Exhausted(m)) => {
                assert!(m.contains("1 MiB") && m.contains("10000 nodes"), "{m}");
            }
            Err(e) => panic!("expected Exhausted, got {e}"),
            Ok(json) => panic!("{} bytes accepted", json.len()),
        }
    }

    #[test]
    fn earlier_formats_are_read_for_migration_and_pod_copies_dropped() {
        let raw = r#"{"format": 1, "revision": 7, "next_identity": 258, "next_node_id": 3,
            "workloads": {"default/a": {"namespace": "default"}},
            "identities": {"256": {"id": 256, "spiffe_id": "spiffe://td/ns/default/sa/a",
                "namespace": "default", "service_account": "a", "labels": {}}},
            "nodes": {"n1": {"name": "n1", "node_id": 2, "attested_at": 5}},
            "join_tokens": {"ab12": {"node": "n1", "created_at": 1, "expires_at": 9, "consumed_at": 5}}}"#;
        let state = SharedState::decode(raw).unwrap().unwrap();
        assert_eq!(state.format, 1);
        assert_eq!(
            state.legacy_identities.keys().copied().collect::<Vec<_>>(),
            vec![256]
        );
        assert_eq!(state.legacy_nodes["n1"].node_id, 2);
        assert_eq!(state.legacy_tokens["ab12"].consumed_at, Some(5));
        assert_eq!(
            (state.next_identity, state.next_node_id),
            (258, 3),
            "the counters are kept: numbers are never reused"
        );
        let mut migrated = state;
        migrated.format = FORMAT;
        migrated.legacy_identities.clear();
        migrated.legacy_nodes.clear();
        migrated.legacy_tokens.clear();
        let json = migrated.encode().unwrap();
        for gone in ["workloads", "identities", "nodes", "join_tokens", "revision"] {
            assert!(!json.contains(gone), "{json}");
        }
    }

    #[test]
    fn state_from_a_newer_format_is_refused() {
        let raw = r#"{"format": 4}"#;
        match SharedState::decode(raw) {
            Ok(Err(StoreError::Backend { message: m, .. })) => assert!(m.contains("upgrade"), "{m}"),
            _ => panic!("a newer format must be refused"),
        }
        assert!(SharedState::decode("{not json").is_err());
    }

    #[test]
    fn log_chunks_fill_up_to_the_limit() {
        let json = "x".repeat(1000);
        let todo: BTreeMap<String, String> = (0..600).map(|i| (format!("{i:04}"), json.clone())).collect();
        let (taken, size) = fit(&BTreeMap::new(), &todo);
        assert_eq!(taken.len(), CHUNK_LIMIT / 1004);
        assert!(size <= CHUNK_LIMIT);
        let full: BTreeMap<String, String> = taken.iter().map(|s| (s.clone(), json.clone())).collect();
        let (more, _) = fit(&full, &todo);
        assert!(more.is_empty(), "a full chunk takes nothing more");
    }

    #[test]
    fn serials_must_be_configmap_keys() {
        assert!(check_serial("0a1b2c").is_ok());
        assert!(check_serial("").is_err());
        assert!(check_serial("a/b").is_err());
    }

    #[test]
    fn only_foreign_versions_and_deletions_are_changes() {
        let own = |v: &str| v == "11";
        let mut t = ChangeTracker {
            version: Some("10".into()),
            listed: false,
        };
        let present = |v: &str| Seen::Present(Some(v.to_owned()));
        // The initial list shows what open() read: no change.
        assert!(!t.observe(Seen::RelistStart, own));
        assert!(!t.observe(present("10"), own));
        assert!(!t.observe(Seen::RelistDone, own));
        assert!(!t.observe(present("11"), own), "our own write");
        assert!(t.observe(present("12"), own), "another replica's write");
        assert!(!t.observe(present("12"), own), "seen already (a re-list)");
        assert!(t.observe(Seen::Deleted, own));
        assert!(t.observe(present("13"), own), "recreated");
        // A re-list that no longer lists the object: it was deleted meanwhile.
        assert!(!t.observe(Seen::RelistStart, own));
        assert!(t.observe(Seen::RelistDone, own));
        assert!(!t.observe(Seen::RelistDone, own));
    }

    #[test]
    fn forbidden_says_which_permission_is_missing() {
        let status = kube::core::Status::failure("configmaps is forbidden", "Forbidden").with_code(403);
        let e = api_error(
            kube::Error::Api(status.boxed()),
            "update",
            "configmaps",
            STATE,
            "keyway",
        );
        let m = e.to_string();
        assert!(
            m.contains("cannot update configmaps in namespace keyway") && m.contains("Role"),
            "{m}"
        );
    }

    #[test]
    fn token_hashes_are_hex() {
        assert_eq!(hex(&[0x00, 0xab, 0x10]), "00ab10");
    }
}
