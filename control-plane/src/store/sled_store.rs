//! The embedded store: sled trees, JSON records, one transaction per change,
//! flushed to disk before a call returns.

use std::path::Path;

use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

use super::*;
use serde::{Deserialize, Serialize};

const CA_KEY: &[u8] = b"state";
const REVISION: &[u8] = b"revision";
const NEXT_IDENTITY: &[u8] = b"next_identity";
const NEXT_NODE_ID: &[u8] = b"next_node_id";

/// Every waiter of one flush gets its result; sled's error is shared, not
/// turned into text, so the store error keeps it as its source.
type FlushWaiter = tokio::sync::oneshot::Sender<Result<(), std::sync::Arc<sled::Error>>>;

/// Group commit: one thread owns `Db::flush`, and every waiter that arrived
/// while a flush was running is answered by the next one. Concurrent
/// `flush_async` calls can deadlock sled 0.34's IO buffers under load (seen
/// in our issuance benchmark), and one fsync per batch is faster anyway.
fn start_flusher(db: sled::Db) -> std::sync::mpsc::Sender<FlushWaiter> {
    let (tx, rx) = std::sync::mpsc::channel::<FlushWaiter>();
    let spawned = std::thread::Builder::new()
        .name("keyway-store-flush".into())
        .spawn(move || {
            // Ends when every SledStore clone (and so every sender) is gone.
            while let Ok(first) = rx.recv() {
                let mut batch = vec![first];
                batch.extend(rx.try_iter());
                let result = db.flush().map(|_| ()).map_err(std::sync::Arc::new);
                for waiter in batch {
                    let _ = waiter.send(result.clone());
                }
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the store flush thread; writes will fail");
    }
    tx
}

/// sled-backed [`Store`]. One process at a time (sled locks the directory).
#[derive(Debug, Clone)]
pub struct SledStore {
    flusher: std::sync::mpsc::Sender<FlushWaiter>,
    ca: sled::Tree,
    tokens: sled::Tree,
    workloads: sled::Tree,
    policies: sled::Tree,
    identities: sled::Tree,
    identity_keys: sled::Tree,
    nodes: sled::Tree,
    issuance: sled::Tree,
    meta: sled::Tree,
}

/// A sled failure, kept as the error's source.
fn backend<E: std::error::Error + Send + Sync + 'static>(e: E) -> StoreError {
    StoreError::backend_from(e.to_string(), e)
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Serializing our own plain records to JSON cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

fn decode<T: for<'de> Deserialize<'de>>(what: &str, bytes: &[u8]) -> StoreResult<T> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        what: what.to_owned(),
        reason: e.to_string(),
    })
}

fn read_u64(v: Option<sled::IVec>) -> u64 {
    v.and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

type TxError = ConflictableTransactionError<StoreError>;

/// Registers `node` inside a transaction: a new node gets the next node id,
/// a known one keeps its id and gets a new attestation time.
fn register_in(
    nodes: &sled::transaction::TransactionalTree,
    meta: &sled::transaction::TransactionalTree,
    node: &str,
    now: i64,
    registration: u32,
) -> Result<NodeRecord, TxError> {
    let existing: Option<NodeRecord> = nodes
        .get(node.as_bytes())?
        .map(|raw| decode("node", &raw))
        .transpose()
        .map_err(TxError::Abort)?;
    let counter = read_u64(meta.get(NEXT_NODE_ID)?);
    let (record, next) =
        rules::register_node(existing, counter, node, now, registration).map_err(TxError::Abort)?;
    if next != counter {
        meta.insert(NEXT_NODE_ID, &next.to_be_bytes())?;
    }
    nodes.insert(node.as_bytes(), encode(&record))?;
    let rev = read_u64(meta.get(REVISION)?) + 1;
    meta.insert(REVISION, &rev.to_be_bytes())?;
    Ok(record)
}

fn tx_result<T>(r: Result<T, TransactionError<StoreError>>) -> StoreResult<T> {
    match r {
        Ok(v) => Ok(v),
        Err(TransactionError::Abort(e)) => Err(e),
        Err(TransactionError::Storage(e)) => Err(backend(e)),
    }
}

impl SledStore {
    /// Opens (creating if needed) the store under `dir`.
    pub fn open(dir: &Path) -> StoreResult<Self> {
        let db = sled::Config::new()
            .path(dir.join("store"))
            .mode(sled::Mode::HighThroughput)
            .open()
            .map_err(|e| match e {
                sled::Error::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock => {
                    StoreError::backend(format!(
                        "{} is in use by another process (is a control plane already running with this --data-dir?)",
                        dir.display()
                    ))
                }
                e => backend(e),
            })?;
        let tree = |name: &str| db.open_tree(name).map_err(backend);
        Ok(Self {
            ca: tree("ca")?,
            tokens: tree("join_tokens")?,
            workloads: tree("workloads")?,
            policies: tree("policies")?,
            identities: tree("identities")?,
            identity_keys: tree("identity_keys")?,
            nodes: tree("nodes")?,
            issuance: tree("issuance")?,
            meta: tree("meta")?,
            flusher: start_flusher(db),
        })
    }

    /// Drops the join tokens [`rules::token_forgotten`] says go. Not
    /// flushed here: the caller's write is, and a token that comes back
    /// after a crash is dropped by the next write.
    fn forget_expired_tokens(&self, now: i64) -> StoreResult<()> {
        let mut batch = sled::Batch::default();
        let mut any = false;
        for kv in self.tokens.iter() {
            let (k, v) = kv.map_err(backend)?;
            // A record that cannot be read is kept (never judged).
            if let Ok(t) = decode::<JoinTokenRecord>("join token", &v)
                && rules::token_forgotten(&t, now)
            {
                batch.remove(k);
                any = true;
            }
        }
        if any {
            self.tokens.apply_batch(batch).map_err(backend)?;
        }
        Ok(())
    }

    /// Returns once everything written before the call is on disk.
    async fn flush(&self) -> StoreResult<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.flusher
            .send(tx)
            .map_err(|_| StoreError::backend("the store flush thread is gone"))?;
        rx.await
            .map_err(|_| StoreError::backend("the store flush thread is gone"))?
            .map_err(|e| StoreError::backend_from(e.to_string(), e))
    }
}

#[async_trait::async_trait]
impl Store for SledStore {
    async fn load_ca(&self) -> StoreResult<Option<CaState>> {
        self.ca
            .get(CA_KEY)
            .map_err(backend)?
            .map(|b| decode("ca state", &b))
            .transpose()
    }

    async fn save_ca(&self, state: &CaState) -> StoreResult<()> {
        self.ca.insert(CA_KEY, encode(state)).map_err(backend)?;
        self.flush().await
    }

    async fn put_join_token(&self, token_hash: &[u8], record: &JoinTokenRecord) -> StoreResult<()> {
        self.forget_expired_tokens(record.created_at)?;
        self.tokens.insert(token_hash, encode(record)).map_err(backend)?;
        self.flush().await
    }

    async fn join_token(&self, token_hash: &[u8]) -> StoreResult<Option<JoinTokenRecord>> {
        self.tokens
            .get(token_hash)
            .map_err(backend)?
            .map(|raw| decode("join token", &raw))
            .transpose()
    }

    async fn consume_join_token(
        &self,
        token_hash: &[u8],
        node: &str,
        now: i64,
        registration: u32,
        issued: &IssuanceRecord,
    ) -> StoreResult<NodeRecord> {
        let result = (&self.tokens, &self.nodes, &self.meta, &self.issuance).transaction(
            |(tokens, nodes, meta, issuance)| {
                let token: Option<JoinTokenRecord> = tokens
                    .get(token_hash)?
                    .map(|raw| decode("join token", &raw))
                    .transpose()
                    .map_err(TxError::Abort)?;
                let used = rules::consume_token(token, node, now).map_err(TxError::Abort)?;
                tokens.insert(token_hash, encode(&used))?;

                let record = register_in(nodes, meta, node, now, registration)?;
                issuance.insert(issued.serial.as_bytes(), encode(issued))?;
                Ok(record)
            },
        );
        let record = tx_result(result)?;
        self.forget_expired_tokens(now)?;
        self.flush().await?;
        Ok(record)
    }

    async fn register_node(
        &self,
        node: &str,
        now: i64,
        registration: u32,
        issued: &IssuanceRecord,
    ) -> StoreResult<NodeRecord> {
        let result = (&self.nodes, &self.meta, &self.issuance).transaction(|(nodes, meta, issuance)| {
            let record = register_in(nodes, meta, node, now, registration)?;
            issuance.insert(issued.serial.as_bytes(), encode(issued))?;
            Ok(record)
        });
        let record = tx_result(result)?;
        self.flush().await?;
        Ok(record)
    }

    async fn log_issuance(&self, record: &IssuanceRecord) -> StoreResult<()> {
        self.issuance
            .insert(record.serial.as_bytes(), encode(record))
            .map_err(backend)?;
        self.flush().await
    }

    async fn prune_issuance(&self, keep: &IssuanceRetention, now: i64) -> StoreResult<PruneOutcome> {
        // (not_after, key, bytes), the first to expire first.
        // A record that cannot be read is kept (never judged) and reported.
        let mut all = Vec::new();
        let (mut unreadable, mut unreadable_bytes) = (0, 0);
        for kv in self.issuance.iter() {
            let (k, v) = kv.map_err(backend)?;
            match decode::<IssuanceRecord>("issuance record", &v) {
                Ok(record) => all.push((record.not_after, k.to_vec(), k.len() + v.len())),
                Err(_) => {
                    unreadable += 1;
                    unreadable_bytes += k.len() + v.len();
                }
            }
        }
        all.sort();
        let cutoff = keep.cutoff(now);
        let (mut kept, mut kept_bytes) = (all.len(), all.iter().map(|(_, _, n)| n).sum::<usize>());
        let mut batch = sled::Batch::default();
        let mut removed = 0;
        for (not_after, key, bytes) in &all {
            if *not_after >= cutoff && kept <= keep.max_records && kept_bytes <= keep.max_bytes {
                break;
            }
            batch.remove(key.as_slice());
            kept -= 1;
            kept_bytes -= bytes;
            removed += 1;
        }
        if removed > 0 {
            self.issuance.apply_batch(batch).map_err(backend)?;
            self.flush().await?;
        }
        Ok(PruneOutcome {
            removed,
            kept: kept + unreadable,
            kept_bytes: kept_bytes + unreadable_bytes,
            unreadable,
        })
    }

    async fn issuance_log(&self) -> StoreResult<Vec<IssuanceRecord>> {
        self.issuance
            .iter()
            .map(|kv| {
                let (_, v) = kv.map_err(backend)?;
                decode("issuance record", &v)
            })
            .collect()
    }

    async fn apply(
        &self,
        workloads: Vec<WorkloadRecord>,
        policies: Vec<PolicyRecord>,
    ) -> StoreResult<ApplyOutcome> {
        let trees = (
            &self.workloads,
            &self.identities,
            &self.identity_keys,
            &self.policies,
            &self.meta,
        );
        let result = trees.transaction(|(wl_tree, id_tree, key_tree, policy_tree, meta)| {
            let mut changes = Vec::new();
            let mut changed = false;
            let mut next_id = read_u64(meta.get(NEXT_IDENTITY)?).max(rules::first_identity());
            let start_id = next_id;
            for w in &workloads {
                let mut w = w.clone();
                let key = identity_key(&w.namespace, &w.service_account, &w.labels);
                let id = match key_tree.get(key.as_bytes())? {
                    Some(raw) => read_u64(Some(raw)) as u32,
                    None => {
                        let id = u32::try_from(next_id).map_err(|_| {
                            TxError::Abort(StoreError::Exhausted("numeric identities exhausted".into()))
                        })?;
                        next_id += 1;
                        key_tree.insert(key.as_bytes(), &u64::from(id).to_be_bytes())?;
                        let rec = IdentityRecord {
                            id,
                            spiffe_id: w.spiffe_id.clone(),
                            namespace: w.namespace.clone(),
                            service_account: w.service_account.clone(),
                            labels: identity_labels(&w.labels),
                        };
                        id_tree.insert(&id.to_be_bytes(), encode(&rec))?;
                        id
                    }
                };
                w.identity = id;
                let wkey = w.key();
                let previous: Option<WorkloadRecord> = wl_tree
                    .get(wkey.as_bytes())?
                    .map(|raw| decode("workload", &raw))
                    .transpose()
                    .map_err(TxError::Abort)?;
                let verb = match previous {
                    Some(p) if p == w => "unchanged",
                    Some(_) => "configured",
                    None => "created",
                };
                if verb != "unchanged" {
                    changed = true;
                    wl_tree.insert(wkey.as_bytes(), encode(&w))?;
                }
                changes.push(format!("workload {wkey} {verb} (identity {id}, {})", w.spiffe_id));
            }
            for p in &policies {
                let pkey = p.key();
                let previous: Option<PolicyRecord> = policy_tree
                    .get(pkey.as_bytes())?
                    .map(|raw| decode("policy", &raw))
                    .transpose()
                    .map_err(TxError::Abort)?;
                let verb = match previous {
                    Some(old) if old == *p => "unchanged",
                    Some(_) => "configured",
                    None => "created",
                };
                if verb != "unchanged" {
                    changed = true;
                    policy_tree.insert(pkey.as_bytes(), encode(p))?;
                }
                changes.push(format!("keywaynetworkpolicy {pkey} {verb}"));
            }
            if next_id != start_id {
                meta.insert(NEXT_IDENTITY, &next_id.to_be_bytes())?;
            }
            let mut rev = read_u64(meta.get(REVISION)?);
            if changed {
                rev += 1;
                meta.insert(REVISION, &rev.to_be_bytes())?;
            }
            Ok(ApplyOutcome {
                changes,
                revision: rev,
            })
        });
        let outcome = tx_result(result)?;
        self.flush().await?;
        Ok(outcome)
    }

    async fn delete(&self, refs: Vec<DocumentRef>) -> StoreResult<ApplyOutcome> {
        let trees = (&self.workloads, &self.policies, &self.meta);
        let result = trees.transaction(|(wl_tree, policy_tree, meta)| {
            let mut changes = Vec::with_capacity(refs.len());
            let mut changed = false;
            for r in &refs {
                let tree = match r.kind {
                    DocumentKind::Workload => wl_tree,
                    DocumentKind::KeywayNetworkPolicy => policy_tree,
                };
                let key = r.key();
                let verb = match tree.remove(key.as_bytes())? {
                    Some(_) => {
                        changed = true;
                        "deleted"
                    }
                    None => "not found",
                };
                changes.push(format!("{} {key} {verb}", r.kind.noun()));
            }
            let mut rev = read_u64(meta.get(REVISION)?);
            if changed {
                rev += 1;
                meta.insert(REVISION, &rev.to_be_bytes())?;
            }
            Ok(ApplyOutcome {
                changes,
                revision: rev,
            })
        });
        let outcome = tx_result(result)?;
        self.flush().await?;
        Ok(outcome)
    }

    async fn set_node_addresses(&self, node: &str, addresses: Vec<String>) -> StoreResult<Option<bool>> {
        let result = (&self.nodes, &self.meta).transaction(|(nodes, meta)| {
            let Some(raw) = nodes.get(node.as_bytes())? else {
                return Ok(None);
            };
            let mut rec: NodeRecord = decode("node", &raw).map_err(TxError::Abort)?;
            if !rules::set_node_addresses(&mut rec, &addresses) {
                return Ok(Some(false));
            }
            nodes.insert(node.as_bytes(), encode(&rec))?;
            let rev = read_u64(meta.get(REVISION)?) + 1;
            meta.insert(REVISION, &rev.to_be_bytes())?;
            Ok(Some(true))
        });
        let changed = tx_result(result)?;
        if changed == Some(true) {
            self.flush().await?;
        }
        Ok(changed)
    }

    async fn allocate_identities(&self, wanted: &[IdentityRecord]) -> StoreResult<Vec<IdentityRecord>> {
        let trees = (&self.identities, &self.identity_keys, &self.meta);
        let result = trees.transaction(|(id_tree, key_tree, meta)| {
            let mut next_id = read_u64(meta.get(NEXT_IDENTITY)?).max(rules::first_identity());
            let start_id = next_id;
            let mut out = Vec::with_capacity(wanted.len());
            for w in wanted {
                let key = identity_key(&w.namespace, &w.service_account, &w.labels);
                let rec = match key_tree.get(key.as_bytes())? {
                    Some(raw) => {
                        let id = read_u64(Some(raw)) as u32;
                        match id_tree.get(id.to_be_bytes())? {
                            Some(raw) => decode("identity", &raw).map_err(TxError::Abort)?,
                            None => {
                                return Err(TxError::Abort(StoreError::Corrupt {
                                    what: format!("identity {id}"),
                                    reason: "its key is indexed but the record is missing".into(),
                                }));
                            }
                        }
                    }
                    None => {
                        let id = u32::try_from(next_id).map_err(|_| {
                            TxError::Abort(StoreError::Exhausted("numeric identities exhausted".into()))
                        })?;
                        next_id += 1;
                        let rec = IdentityRecord {
                            id,
                            labels: identity_labels(&w.labels),
                            ..w.clone()
                        };
                        key_tree.insert(key.as_bytes(), &u64::from(id).to_be_bytes())?;
                        id_tree.insert(&id.to_be_bytes(), encode(&rec))?;
                        rec
                    }
                };
                out.push(rec);
            }
            if next_id != start_id {
                meta.insert(NEXT_IDENTITY, &next_id.to_be_bytes())?;
                let rev = read_u64(meta.get(REVISION)?) + 1;
                meta.insert(REVISION, &rev.to_be_bytes())?;
            }
            Ok((out, next_id != start_id))
        });
        let (out, changed) = tx_result(result)?;
        if changed {
            self.flush().await?;
        }
        Ok(out)
    }

    async fn forget_identities(&self, ids: &[u32]) -> StoreResult<usize> {
        let used: std::collections::HashSet<u32> = self
            .workloads
            .iter()
            .values()
            .map(|raw| decode::<WorkloadRecord>("workload", &raw.map_err(backend)?).map(|w| w.identity))
            .collect::<StoreResult<_>>()?;
        let gone: Vec<u32> = ids.iter().copied().filter(|id| !used.contains(id)).collect();
        if gone.is_empty() {
            return Ok(0);
        }
        let result =
            (&self.identities, &self.identity_keys, &self.meta).transaction(|(id_tree, key_tree, meta)| {
                let mut n = 0;
                for id in &gone {
                    let Some(raw) = id_tree.remove(&id.to_be_bytes())? else {
                        continue;
                    };
                    let rec: IdentityRecord = decode("identity", &raw).map_err(TxError::Abort)?;
                    key_tree
                        .remove(identity_key(&rec.namespace, &rec.service_account, &rec.labels).as_bytes())?;
                    n += 1;
                }
                if n > 0 {
                    let rev = read_u64(meta.get(REVISION)?) + 1;
                    meta.insert(REVISION, &rev.to_be_bytes())?;
                }
                Ok(n)
            });
        let n = tx_result(result)?;
        if n > 0 {
            self.flush().await?;
        }
        Ok(n)
    }

    async fn revoke_node(&self, node: &str) -> StoreResult<bool> {
        let result = (&self.nodes, &self.meta).transaction(|(nodes, meta)| {
            if nodes.remove(node.as_bytes())?.is_none() {
                return Ok(false);
            }
            let rev = read_u64(meta.get(REVISION)?) + 1;
            meta.insert(REVISION, &rev.to_be_bytes())?;
            Ok(true)
        });
        let revoked = tx_result(result)?;
        if revoked {
            self.flush().await?;
        }
        Ok(revoked)
    }

    async fn registry(&self) -> StoreResult<RegistrySnapshot> {
        fn all<T: for<'de> Deserialize<'de>>(tree: &sled::Tree, what: &str) -> StoreResult<Vec<T>> {
            tree.iter()
                .map(|kv| {
                    let (_, v) = kv.map_err(backend)?;
                    decode(what, &v)
                })
                .collect()
        }
        Ok(RegistrySnapshot {
            revision: read_u64(self.meta.get(REVISION).map_err(backend)?),
            workloads: all::<WorkloadRecord>(&self.workloads, "workload")?
                .into_iter()
                .map(std::sync::Arc::new)
                .collect(),
            identities: all(&self.identities, "identity")?,
            nodes: all(&self.nodes, "node")?,
            policies: all(&self.policies, "policy")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::policy::{AuthMode, PolicySpec, Rule};

    fn policy(name: &str, auth: AuthMode) -> PolicyRecord {
        PolicyRecord {
            namespace: "default".into(),
            name: name.into(),
            spec: PolicySpec {
                ingress: Some(vec![Rule {
                    authentication: auth,
                    ..Default::default()
                }]),
                ..Default::default()
            },
        }
    }

    /// Drops `store` and opens the same directory again. The flush thread
    /// lets go of the database once it sees the store gone; wait for the
    /// lock with a deadline.
    async fn reopen(store: SledStore, dir: &Path) -> SledStore {
        drop(store);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match SledStore::open(dir) {
                Ok(s) => break s,
                Err(e) if std::time::Instant::now() < deadline => {
                    assert!(e.to_string().contains("lock"), "{e}");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                Err(e) => panic!("store still locked after 10s: {e}"),
            }
        }
    }

    fn workload(name: &str, node: &str) -> WorkloadRecord {
        WorkloadRecord {
            namespace: "default".into(),
            name: name.into(),
            service_account: name.into(),
            node: node.into(),
            ips: vec![],
            labels: Default::default(),
            selectors: vec![],
            svid_ttl_secs: None,
            identity: 0,
            spiffe_id: format!("spiffe://td/ns/default/sa/{name}"),
        }
    }

    fn doc(kind: DocumentKind, name: &str) -> DocumentRef {
        DocumentRef {
            kind,
            namespace: "default".into(),
            name: name.into(),
        }
    }

    #[tokio::test]
    async fn deletes_are_durable_and_identities_are_never_reused() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let applied = store
            .apply(
                vec![workload("a", "n1"), workload("b", "n2")],
                vec![policy("p", AuthMode::Required)],
            )
            .await
            .unwrap();
        let id_of = |reg: &RegistrySnapshot, name: &str| {
            reg.workloads.iter().find(|w| w.name == name).map(|w| w.identity)
        };
        let reg = store.registry().await.unwrap();
        let a_id = id_of(&reg, "a").unwrap();

        let deleted = store
            .delete(vec![
                doc(DocumentKind::Workload, "a"),
                doc(DocumentKind::KeywayNetworkPolicy, "nope"),
                doc(DocumentKind::KeywayNetworkPolicy, "p"),
            ])
            .await
            .unwrap();
        assert_eq!(
            deleted.changes,
            vec![
                "workload default/a deleted",
                "keywaynetworkpolicy default/nope not found",
                "keywaynetworkpolicy default/p deleted",
            ]
        );
        assert_eq!(deleted.revision, applied.revision + 1);
        // Deleting what is gone changes nothing.
        let again = store
            .delete(vec![doc(DocumentKind::Workload, "a")])
            .await
            .unwrap();
        assert_eq!(again.changes, vec!["workload default/a not found"]);
        assert_eq!(again.revision, deleted.revision);

        let store = reopen(store, dir.path()).await;
        let reg = store.registry().await.unwrap();
        assert_eq!(reg.revision, deleted.revision);
        assert_eq!(id_of(&reg, "a"), None);
        assert!(id_of(&reg, "b").is_some());
        assert!(reg.policies.is_empty());
        assert!(
            reg.identities.iter().any(|i| i.id == a_id),
            "the identity stays allocated"
        );
        // A new identity does not take a's number; a comes back with it.
        store.apply(vec![workload("c", "n1")], vec![]).await.unwrap();
        store.apply(vec![workload("a", "n1")], vec![]).await.unwrap();
        let reg = store.registry().await.unwrap();
        assert_eq!(id_of(&reg, "a"), Some(a_id));
        assert_ne!(id_of(&reg, "c"), Some(a_id));
    }

    /// Registers node n1 with a fresh join token.
    async fn attest(store: &SledStore, token: &[u8], serial: &str) -> NodeRecord {
        let rec = JoinTokenRecord {
            node: "n1".into(),
            created_at: 0,
            expires_at: i64::MAX,
            consumed_at: None,
        };
        store.put_join_token(token, &rec).await.unwrap();
        let issued = IssuanceRecord {
            serial: serial.into(),
            spiffe_id: "spiffe://td/keyway/node/n1".into(),
            requester: "n1".into(),
            ca_id: "ca".into(),
            issued_at: 0,
            not_after: 1,
        };
        store
            .consume_join_token(token, "n1", 1, 7, &issued)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn node_addresses_are_stored_durably_and_only_when_changed() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let addrs = vec!["10.0.0.1:4250".to_string()];
        assert_eq!(
            store.set_node_addresses("n1", addrs.clone()).await.unwrap(),
            None,
            "no such node"
        );
        let node = attest(&store, b"t1", "s1").await;
        assert!(node.addresses.is_empty());
        let before = store.registry().await.unwrap().revision;
        assert_eq!(
            store.set_node_addresses("n1", addrs.clone()).await.unwrap(),
            Some(true)
        );
        let after = store.registry().await.unwrap().revision;
        assert_eq!(after, before + 1);
        assert_eq!(
            store.set_node_addresses("n1", addrs.clone()).await.unwrap(),
            Some(false)
        );
        assert_eq!(store.registry().await.unwrap().revision, after, "unchanged");

        let store = reopen(store, dir.path()).await;
        let reg = store.registry().await.unwrap();
        assert_eq!(reg.nodes[0].addresses, addrs);
        // Attesting again keeps the node id and the addresses.
        let again = attest(&store, b"t2", "s2").await;
        assert_eq!((again.node_id, again.addresses), (node.node_id, addrs));
    }

    #[tokio::test]
    async fn policies_are_upserted_by_name_durably_and_idempotently() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let first = store
            .apply(
                vec![],
                vec![policy("a", AuthMode::Required), policy("b", AuthMode::Required)],
            )
            .await
            .unwrap();
        assert_eq!(
            first.changes,
            vec![
                "keywaynetworkpolicy default/a created",
                "keywaynetworkpolicy default/b created"
            ]
        );
        let again = store
            .apply(vec![], vec![policy("a", AuthMode::Required)])
            .await
            .unwrap();
        assert_eq!(again.changes, vec!["keywaynetworkpolicy default/a unchanged"]);
        assert_eq!(again.revision, first.revision, "nothing changed");
        let replaced = store
            .apply(vec![], vec![policy("a", AuthMode::Disabled)])
            .await
            .unwrap();
        assert_eq!(replaced.changes, vec!["keywaynetworkpolicy default/a configured"]);
        assert_eq!(replaced.revision, first.revision + 1);
        let store = reopen(store, dir.path()).await;
        let reg = store.registry().await.unwrap();
        assert_eq!(reg.revision, replaced.revision);
        assert_eq!(
            reg.policies,
            vec![policy("a", AuthMode::Disabled), policy("b", AuthMode::Required)]
        );
    }
}
