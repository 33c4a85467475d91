//! What each node sees of the registry, and the deltas between two views.
//!
//! A node gets its own workloads, every identity some workload (on any
//! node) uses, the node table with each agent's mutual-auth addresses, the
//! bundle, the cluster-wide ipcache (every workload IP -> identity and node)
//! and the compiled policy entries whose subject runs on it. Other nodes'
//! workloads (names, selectors) are not sent: SVIDs are scoped to where a
//! workload runs, but mutual auth has to map a peer's numeric identity to
//! the SPIFFE ID its certificate must carry, so the identity table is
//! cluster-wide like the ipcache.
//!
//! # Cost per change
//!
//! The cluster-wide part (identities, node table, ipcache) is the same for
//! every node, so it is kept once, not per node, and kept up to date change
//! by change ([`Cluster::next`]): the workloads that differ from the last
//! version are found by one merge walk that compares shared records by
//! pointer, and only they are taken out of the indexes and put back, and
//! only the addresses they claim looked at again. The maps are persistent
//! ([`imbl`]), so the new version shares every untouched entry with the last
//! one instead of copying it. The version remembers the keys the change
//! changed. A node's stream keeps only
//! its own part (its workloads and policy entries, found through a per-node
//! index) and the version it has sent; on a change it sends the cluster-wide
//! keys changed since that version, read from a short history, plus the
//! difference of its own part, which it updates only when a change touched
//! its node (a workload placed on, changed on or removed from it) or policy
//! was compiled again, and then in place: records the registry still shares
//! are not converted again. So a change costs each stream the size of
//! the change and of its own node, not of the cluster, and a node whose
//! view did not change is sent nothing. A stream more than [`HISTORY`]
//! versions behind is sent a fresh snapshot (`reset`). Policy is compiled
//! again only when the policies or the set of identities in use changed.
//!
//! # Snapshots pin no old version
//!
//! A snapshot is sent page by page ([`Stream::snapshot_page`]), each page
//! read in key order from the newest version, so a slow reader holds a
//! cursor, never a version of the registry (a thousand agents connecting
//! while the registry changes would otherwise keep a thousand versions
//! alive). The pages of one snapshot may come from several versions; the
//! stream then sends what changed since the version it opened at, which
//! covers every key that differs between those versions, and only that last
//! message is `complete`. Receivers act on complete states only.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;

use imbl::{OrdMap, OrdSet};

use proto::keyway::{self as pb, update::Kind};

use crate::model::{IdentityRecord, PolicyRecord, WorkloadRecord};
use crate::policy::{self, CompiledPolicy};
use crate::store::RegistrySnapshot;

/// Updates per message while streaming a snapshot; keeps every message far
/// below gRPC limits however many identities a node has.
pub const UPDATES_PER_MESSAGE: usize = 256;

/// Registry versions whose changed keys a [`Cluster`] remembers: with
/// batches of about 20 ms under churn, a stream may lag some 20 s before it
/// needs a snapshot. Each entry is the keys one change touched.
pub const HISTORY: usize = 1024;

/// The cluster-wide part of every node's view. The maps are persistent
/// ([`imbl`] B-trees): a version shares every entry a change did not touch
/// with the version before, so making the next version costs the size of
/// the change, not of the cluster, and holding both costs only the
/// difference.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Shared {
    /// Every identity with a workload on some node.
    pub identities: OrdMap<u32, pb::Identity>,
    pub nodes: OrdMap<String, pb::Node>,
    /// Keyed by CIDR (`a.b.c.d/32`, `x::y/128`).
    pub ipcache: OrdMap<String, pb::IpcacheEntry>,
}

/// The keys of [`Shared`] one registry change touched, and the nodes whose
/// own part ([`Local`]) it may have changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SharedChanges {
    pub identities: BTreeSet<u32>,
    pub nodes: BTreeSet<String>,
    pub ipcache: BTreeSet<String>,
    /// Nodes a workload was placed on, changed on, or removed from.
    pub locals: BTreeSet<String>,
    /// Policy was compiled again: any node's entries may differ.
    pub every_local: bool,
}

impl SharedChanges {
    fn extend(&mut self, other: &SharedChanges) {
        self.identities.extend(other.identities.iter().copied());
        self.nodes.extend(other.nodes.iter().cloned());
        self.ipcache.extend(other.ipcache.iter().cloned());
        self.locals.extend(other.locals.iter().cloned());
        self.every_local |= other.every_local;
    }

    /// Whether `node`'s own part may have changed.
    fn touches(&self, node: &str) -> bool {
        self.every_local || self.locals.contains(node)
    }
}

/// The keys whose entries differ between `old` and `new`.
fn keys_changed<K: Ord + Clone, V: Clone + PartialEq>(old: &OrdMap<K, V>, new: &OrdMap<K, V>) -> BTreeSet<K> {
    let mut out: BTreeSet<K> = new
        .iter()
        .filter(|(k, v)| old.get(*k) != Some(*v))
        .map(|(k, _)| k.clone())
        .collect();
    out.extend(old.keys().filter(|k| !new.contains_key(*k)).cloned());
    out
}

/// Records by (namespace, name).
fn by_name(records: &[Arc<WorkloadRecord>]) -> HashMap<(&str, &str), &Arc<WorkloadRecord>> {
    records
        .iter()
        .map(|w| ((w.namespace.as_str(), w.name.as_str()), w))
        .collect()
}

/// Replaces each record of `new` that equals the one with its key in `old`
/// by `old`'s, so a version read back from a store shares what did not
/// change with the last one (in memory, and for the streams, which keep a
/// record they still share as it is).
pub fn share_unchanged(old: &[Arc<WorkloadRecord>], new: &mut [Arc<WorkloadRecord>]) {
    let before = by_name(old);
    for w in new.iter_mut() {
        if let Some(b) = before.get(&(w.namespace.as_str(), w.name.as_str()))
            && *b == w
        {
            *w = Arc::clone(b);
        }
    }
}

/// The registry's order of workloads (`namespace/name`).
fn registry_order(a: &WorkloadRecord, b: &WorkloadRecord) -> Ordering {
    crate::store::key_order(&a.namespace, &a.name, &b.namespace, &b.name)
}

/// A workload record in an index, ordered (and equal) by its key alone.
#[derive(Debug, Clone)]
struct ByKey(Arc<WorkloadRecord>);

impl PartialEq for ByKey {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for ByKey {}

impl PartialOrd for ByKey {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ByKey {
    fn cmp(&self, other: &Self) -> Ordering {
        registry_order(&self.0, &other.0)
    }
}

/// Workloads by some string of theirs (node, SPIFFE ID), in key order.
type Index = imbl::HashMap<String, OrdSet<ByKey>>;

fn index_add(index: &mut Index, key: &str, w: &Arc<WorkloadRecord>) {
    match index.get_mut(key) {
        Some(set) => {
            set.insert(ByKey(Arc::clone(w)));
        }
        None => {
            index.insert(key.to_owned(), OrdSet::unit(ByKey(Arc::clone(w))));
        }
    }
}

fn index_remove(index: &mut Index, key: &str, w: &Arc<WorkloadRecord>) {
    if let Some(set) = index.get_mut(key) {
        set.remove(&ByKey(Arc::clone(w)));
        if set.is_empty() {
            index.remove(key);
        }
    }
}

fn identity_message(i: &IdentityRecord) -> pb::Identity {
    pb::Identity {
        id: i.id,
        spiffe_id: i.spiffe_id.clone(),
        namespace: i.namespace.clone(),
        service_account: i.service_account.clone(),
        labels: i.labels.clone().into_iter().collect(),
    }
}

fn node_message(n: &crate::model::NodeRecord) -> pb::Node {
    pb::Node {
        name: n.name.clone(),
        node_id: u32::from(n.node_id),
        addresses: n.addresses.clone(),
    }
}

/// The ipcache keys of a workload's addresses (an address that does not
/// parse has none).
fn cidrs(w: &WorkloadRecord) -> impl Iterator<Item = String> + '_ {
    w.ips.iter().filter_map(|ip| match ip.parse::<IpAddr>() {
        Ok(IpAddr::V4(a)) => Some(format!("{a}/32")),
        Ok(IpAddr::V6(a)) => Some(format!("{a}/128")),
        Err(_) => None,
    })
}

/// The registry as every sync stream sees it: the stored records, the
/// policy compiled from them, the cluster-wide view, and indexes. All but
/// the records are kept up to date change by change ([`Cluster::next`]),
/// in persistent maps shared between versions.
#[derive(Debug, Default, Clone)]
pub struct Cluster {
    pub records: RegistrySnapshot,
    /// Shared between versions until policy is compiled again.
    pub policy: Arc<CompiledPolicy>,
    pub shared: Shared,
    /// Grows by one with every published change.
    pub version: u64,
    /// Node name -> the workloads placed on it.
    by_node: Index,
    /// SPIFFE ID -> the workloads with it.
    by_spiffe_id: Index,
    /// ipcache key -> the workloads that claim the address, in key order:
    /// the first holds it.
    claims: OrdMap<String, Vec<Arc<WorkloadRecord>>>,
    /// Identity -> how many workloads have it.
    in_use: OrdMap<u32, usize>,
    /// What each of the last versions changed in `shared`, oldest first.
    history: VecDeque<(u64, Arc<SharedChanges>)>,
    /// What policy was compiled from.
    compiled_from: Arc<(Vec<IdentityRecord>, Vec<PolicyRecord>)>,
}

impl Cluster {
    /// Compiles the policy for the identities that have a workload (an
    /// identity nobody uses has no address and needs no entries).
    pub fn new(records: RegistrySnapshot, budget: policy::Budget) -> Self {
        Self::default().build(None, records, budget)
    }

    /// The next version after `self`: what changed in the cluster-wide view
    /// is remembered for the streams, and policy is compiled again only when
    /// its inputs changed.
    pub fn next(&self, records: RegistrySnapshot, budget: policy::Budget) -> Self {
        // Every field is O(1) to clone but the records, which are replaced.
        let next = Cluster {
            records: RegistrySnapshot::default(),
            policy: Arc::clone(&self.policy),
            shared: self.shared.clone(),
            version: self.version,
            by_node: self.by_node.clone(),
            by_spiffe_id: self.by_spiffe_id.clone(),
            claims: self.claims.clone(),
            in_use: self.in_use.clone(),
            history: self.history.clone(),
            compiled_from: Arc::clone(&self.compiled_from),
        };
        next.build(Some(&self.records), records, budget)
    }

    /// Takes `self` (a copy of the version made from `old`, or an empty
    /// one) to `records`. Workloads are compared with the last version's in one
    /// merge walk (a record the registry still shares compares by pointer);
    /// only those that differ are taken out of the indexes and put back, and
    /// only the addresses they claim (or whose node changed number) are
    /// looked at again. So a change of one pod costs a pointer comparison
    /// per workload and a few map operations, whatever the cluster's size.
    fn build(
        mut self,
        old: Option<&RegistrySnapshot>,
        mut records: RegistrySnapshot,
        budget: policy::Budget,
    ) -> Self {
        let next = old.is_some();
        let empty = RegistrySnapshot::default();
        let old_records = old.unwrap_or(&empty);
        if !records
            .workloads
            .is_sorted_by(|a, b| registry_order(a, b) != Ordering::Greater)
        {
            records.workloads.sort_by(|a, b| registry_order(a, b));
        }
        let mut locals = BTreeSet::new();
        let mut dirty: BTreeSet<String> = BTreeSet::new();
        {
            let mut old = old_records.workloads.iter().peekable();
            let mut new = records.workloads.iter().peekable();
            loop {
                let (o, n) = match (old.peek(), new.peek()) {
                    (None, None) => break,
                    // Most records are shared with the last version.
                    (Some(o), Some(n)) if Arc::ptr_eq(o, n) => {
                        old.next();
                        new.next();
                        continue;
                    }
                    (Some(_), None) => (old.next(), None),
                    (None, Some(_)) => (None, new.next()),
                    (Some(o), Some(n)) => match registry_order(o, n) {
                        Ordering::Less => (old.next(), None),
                        Ordering::Greater => (None, new.next()),
                        Ordering::Equal => {
                            let (o, n) = (old.next(), new.next());
                            // `Arc`'s `==` compares pointers first.
                            if o == n {
                                continue;
                            }
                            (o, n)
                        }
                    },
                };
                if let Some(o) = o {
                    self.forget(o, &mut dirty);
                    locals.insert(o.node.clone());
                }
                if let Some(n) = n {
                    self.learn(n, &mut dirty);
                    locals.insert(n.node.clone());
                }
            }
        }
        // Compared before copied: under pod churn neither input changes.
        let used = records
            .identities
            .iter()
            .filter(|i| self.in_use.contains_key(&i.id));
        let recompiled = !next
            || !used.clone().eq(self.compiled_from.0.iter())
            || records.policies != self.compiled_from.1;
        let mut changes = SharedChanges::default();
        if recompiled {
            self.compiled_from = Arc::new((used.cloned().collect(), records.policies.clone()));
            self.policy = Arc::new(policy::compile(
                &self.compiled_from.0,
                &self.compiled_from.1,
                budget,
            ));
            let identities: OrdMap<u32, pb::Identity> = self
                .compiled_from
                .0
                .iter()
                .map(|i| (i.id, identity_message(i)))
                .collect();
            changes.identities = keys_changed(&self.shared.identities, &identities);
            self.shared.identities = identities;
        }
        if !next || records.nodes != old_records.nodes {
            let nodes: OrdMap<String, pb::Node> = records
                .nodes
                .iter()
                .map(|n| (n.name.clone(), node_message(n)))
                .collect();
            changes.nodes = keys_changed(&self.shared.nodes, &nodes);
            // A node that changed number changes its workloads' entries.
            for name in &changes.nodes {
                let id = |m: &OrdMap<String, pb::Node>| m.get(name).map(|n| n.node_id);
                if id(&self.shared.nodes) != id(&nodes) {
                    for w in self.by_node.get(name.as_str()).into_iter().flatten() {
                        dirty.extend(cidrs(&w.0));
                    }
                }
            }
            self.shared.nodes = nodes;
        }
        for cidr in dirty {
            let want = self
                .claims
                .get(&cidr)
                .and_then(|c| c.first())
                .map(|w| pb::IpcacheEntry {
                    cidr: cidr.clone(),
                    identity: w.identity,
                    node_id: self.shared.nodes.get(&w.node).map_or(0, |n| n.node_id),
                    namespace: w.namespace.clone(),
                    workload: w.name.clone(),
                });
            if self.shared.ipcache.get(&cidr) == want.as_ref() {
                continue;
            }
            match want {
                Some(e) => self.shared.ipcache.insert(cidr.clone(), e),
                None => self.shared.ipcache.remove(&cidr),
            };
            changes.ipcache.insert(cidr);
        }
        self.records = records;
        if next {
            self.version += 1;
            changes.every_local = recompiled;
            if !recompiled {
                changes.locals = locals;
            }
            self.history.push_back((self.version, Arc::new(changes)));
            while self.history.len() > HISTORY {
                self.history.pop_front();
            }
        }
        self
    }

    /// Takes a workload of the last version out of the indexes and claims.
    fn forget(&mut self, w: &Arc<WorkloadRecord>, dirty: &mut BTreeSet<String>) {
        index_remove(&mut self.by_node, &w.node, w);
        index_remove(&mut self.by_spiffe_id, &w.spiffe_id, w);
        if let Some(n) = self.in_use.get_mut(&w.identity) {
            *n -= 1;
            if *n == 0 {
                self.in_use.remove(&w.identity);
            }
        }
        for cidr in cidrs(w) {
            if let Some(c) = self.claims.get_mut(&cidr) {
                c.retain(|x| registry_order(x, w) != Ordering::Equal);
                if c.is_empty() {
                    self.claims.remove(&cidr);
                }
            }
            dirty.insert(cidr);
        }
    }

    /// Puts a workload of the new version in the indexes and claims.
    fn learn(&mut self, w: &Arc<WorkloadRecord>, dirty: &mut BTreeSet<String>) {
        index_add(&mut self.by_node, &w.node, w);
        index_add(&mut self.by_spiffe_id, &w.spiffe_id, w);
        *self.in_use.entry(w.identity).or_insert(0) += 1;
        for cidr in cidrs(w) {
            let c = self.claims.entry(cidr.clone()).or_default();
            // Workloads come in namespace/name order; if two claim one
            // address the first keeps it. (One workload listing an address
            // twice claims it once.)
            if let Err(at) = c.binary_search_by(|x| registry_order(x, w)) {
                c.insert(at, Arc::clone(w));
            }
            dirty.insert(cidr);
        }
    }

    /// The workloads placed on `node`.
    pub fn workloads_on<'a>(
        &'a self,
        node: &str,
    ) -> impl Iterator<Item = &'a crate::model::WorkloadRecord> + 'a {
        self.records_on(node).map(|w| &**w)
    }

    /// The workloads placed on `node`, as the registry shares them.
    fn records_on<'a>(&'a self, node: &str) -> impl Iterator<Item = &'a Arc<WorkloadRecord>> + 'a {
        self.by_node.get(node).into_iter().flatten().map(|w| &w.0)
    }

    /// The workloads with this SPIFFE ID, on any node.
    pub fn workloads_with<'a>(
        &'a self,
        spiffe_id: &str,
    ) -> impl Iterator<Item = &'a crate::model::WorkloadRecord> + 'a {
        self.by_spiffe_id
            .get(spiffe_id)
            .into_iter()
            .flatten()
            .map(|w| &*w.0)
    }

    /// The cluster-wide keys changed after `version` up to this one, or
    /// `None` when the history no longer reaches back that far.
    fn changed_since(&self, version: u64) -> Option<SharedChanges> {
        let mut out = SharedChanges::default();
        if version == self.version {
            return Some(out);
        }
        let first = self.history.front()?.0;
        if version < first.saturating_sub(1) || version > self.version {
            return None;
        }
        for (v, changes) in &self.history {
            if *v > version {
                out.extend(changes);
            }
        }
        Some(out)
    }
}

/// One node's own part of the registry: what a sync stream keeps.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Local {
    /// The workloads placed on this node.
    pub workloads: BTreeMap<(String, String), pb::Workload>,
    /// The entries whose subject has a workload on this node.
    pub policy: BTreeMap<policy::Key, pb::PolicyEntry>,
    /// The records `workloads` was built from, in the same order: a record
    /// the registry still shares is not converted again.
    records: Vec<Arc<WorkloadRecord>>,
    /// The identities with a workload on this node (whose entries `policy`
    /// holds).
    identities: BTreeSet<u32>,
}

/// One node's whole slice of the registry (what its agent ends up holding).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct NodeView {
    pub workloads: BTreeMap<(String, String), pb::Workload>,
    pub identities: BTreeMap<u32, pb::Identity>,
    pub nodes: BTreeMap<String, pb::Node>,
    pub ipcache: BTreeMap<String, pb::IpcacheEntry>,
    pub policy: BTreeMap<policy::Key, pb::PolicyEntry>,
}

fn policy_key(k: &policy::Key) -> pb::PolicyKey {
    pb::PolicyKey {
        subject: k.subject,
        peer: k.peer,
        port_block: k.port_block,
        protocol: k.protocol,
        direction: k.direction,
    }
}

/// `node`'s own part of `cluster`.
pub fn local_view(cluster: &Cluster, node: &str) -> Local {
    let mut view = Local::default();
    refresh_local(cluster, node, &mut view, true, None);
    view
}

fn workload_message(w: &WorkloadRecord) -> pb::Workload {
    pb::Workload {
        namespace: w.namespace.clone(),
        name: w.name.clone(),
        service_account: w.service_account.clone(),
        node: w.node.clone(),
        ips: w.ips.clone(),
        labels: w.labels.clone().into_iter().collect(),
        selectors: w.selectors.clone(),
        identity: w.identity,
        spiffe_id: w.spiffe_id.clone(),
        svid_ttl_seconds: w.svid_ttl_secs.unwrap_or(0),
    }
}

/// Brings `local` to `node`'s part of `cluster`, and records in `delta` the
/// updates that takes. A workload whose record the registry still shares is
/// kept as it is (moved, not rebuilt); the policy part is rebuilt only when
/// policy was compiled again (`policy_changed`) or the set of identities on
/// the node changed. What a receiver ends up holding must equal the part
/// built from nothing (`local_view`, the same function from an empty
/// `Local`, where every record is converted); the random-change tests check
/// that after every change, with records changed in place, moved, added and
/// removed.
fn refresh_local(
    cluster: &Cluster,
    node: &str,
    local: &mut Local,
    policy_changed: bool,
    mut delta: Option<&mut Delta>,
) {
    let by_key = |a: &Arc<WorkloadRecord>, b: &Arc<WorkloadRecord>| {
        (a.namespace.as_str(), a.name.as_str()).cmp(&(b.namespace.as_str(), b.name.as_str()))
    };
    // The registry's order is `namespace/name` as one string, which is not
    // the map's (namespace, name) order ("a-b" and "a"): the walk below
    // needs the map's.
    let mut now: Vec<&Arc<WorkloadRecord>> = cluster.records_on(node).collect();
    now.sort_by(|a, b| by_key(a, b));
    let unchanged =
        now.len() == local.records.len() && now.iter().zip(&local.records).all(|(a, b)| Arc::ptr_eq(a, b));
    if !unchanged {
        // Both lists are in (namespace, name) order, as the map is, one
        // record per key.
        debug_assert_eq!(local.records.len(), local.workloads.len());
        let mut old = std::mem::take(&mut local.records)
            .into_iter()
            .zip(std::mem::take(&mut local.workloads))
            .peekable();
        let deleted = |key: (String, String), delta: &mut Option<&mut Delta>| {
            if let Some(d) = delta.as_deref_mut() {
                d.workload_del.push(pb::WorkloadRef {
                    namespace: key.0,
                    name: key.1,
                });
            }
        };
        for r in &now {
            while let Some((o, _)) = old.peek() {
                if by_key(o, r) != std::cmp::Ordering::Less {
                    break;
                }
                let (_, (key, _)) = old.next().expect("peeked");
                deleted(key, &mut delta);
            }
            let held = match old.peek() {
                Some((o, _)) if by_key(o, r) == std::cmp::Ordering::Equal => old.next(),
                _ => None,
            };
            let (key, message, changed) = match held {
                Some((o, (key, message))) if Arc::ptr_eq(&o, r) => (key, message, false),
                Some((_, (key, old))) => {
                    let message = workload_message(r);
                    let changed = message != old;
                    (key, message, changed)
                }
                None => ((r.namespace.clone(), r.name.clone()), workload_message(r), true),
            };
            if changed && let Some(d) = delta.as_deref_mut() {
                d.workload_up.push(message.clone());
            }
            local.workloads.insert(key, message);
            local.records.push(Arc::clone(r));
        }
        for (_, (key, _)) in old {
            deleted(key, &mut delta);
        }
    }
    let identities: BTreeSet<u32> = now.iter().map(|w| w.identity).collect();
    if !policy_changed && identities == local.identities {
        return;
    }
    let mut policy = BTreeMap::new();
    for id in &identities {
        for (k, v) in cluster.policy.subject(*id) {
            policy.insert(
                *k,
                pb::PolicyEntry {
                    key: Some(policy_key(k)),
                    rule: v.rule.to_string(),
                    allowed: v.allowed.to_bytes().to_vec(),
                    authenticated: if v.authenticated.is_empty() {
                        Vec::new()
                    } else {
                        v.authenticated.to_bytes().to_vec()
                    },
                    r#final: v.final_,
                },
            );
        }
    }
    if let Some(d) = delta {
        d.policy(&local.policy, &policy);
    }
    local.policy = policy;
    local.identities = identities;
}

/// The whole slice of `cluster` that `node` needs.
pub fn node_view(cluster: &Cluster, node: &str) -> NodeView {
    let local = local_view(cluster, node);
    NodeView {
        workloads: local.workloads,
        identities: cluster.shared.identities.clone().into_iter().collect(),
        nodes: cluster.shared.nodes.clone().into_iter().collect(),
        ipcache: cluster.shared.ipcache.clone().into_iter().collect(),
        policy: local.policy,
    }
}

fn update(kind: Kind) -> pb::Update {
    pb::Update { kind: Some(kind) }
}

/// Everything in `view`, as upserts (for a snapshot).
pub fn full(view: &NodeView) -> Vec<pb::Update> {
    diff(&NodeView::default(), view)
}

/// Upserts and deletes of each kind, put in the order receivers need.
#[derive(Default)]
struct Delta {
    identity_up: Vec<pb::Identity>,
    node_up: Vec<pb::Node>,
    workload_up: Vec<pb::Workload>,
    ipcache_up: Vec<pb::IpcacheEntry>,
    policy_up: Vec<pb::PolicyEntry>,
    policy_del: Vec<pb::PolicyKey>,
    ipcache_del: Vec<String>,
    workload_del: Vec<pb::WorkloadRef>,
    identity_del: Vec<u32>,
    node_del: Vec<String>,
}

impl Delta {
    /// Identities and nodes are upserted before the workloads, ipcache and
    /// policy entries that refer to them, and every delete comes after every
    /// upsert (referring entries first), so a receiver never holds an entry
    /// whose identity it does not know.
    fn into_updates(self) -> Vec<pb::Update> {
        let mut out = Vec::new();
        out.extend(
            self.identity_up
                .into_iter()
                .map(|i| update(Kind::IdentityUpsert(i))),
        );
        out.extend(self.node_up.into_iter().map(|n| update(Kind::NodeUpsert(n))));
        out.extend(
            self.workload_up
                .into_iter()
                .map(|w| update(Kind::WorkloadUpsert(w))),
        );
        out.extend(
            self.ipcache_up
                .into_iter()
                .map(|e| update(Kind::IpcacheUpsert(e))),
        );
        out.extend(self.policy_up.into_iter().map(|e| update(Kind::PolicyUpsert(e))));
        out.extend(self.policy_del.into_iter().map(|k| update(Kind::PolicyDelete(k))));
        out.extend(
            self.ipcache_del
                .into_iter()
                .map(|c| update(Kind::IpcacheDelete(c))),
        );
        out.extend(
            self.workload_del
                .into_iter()
                .map(|r| update(Kind::WorkloadDelete(r))),
        );
        out.extend(
            self.identity_del
                .into_iter()
                .map(|i| update(Kind::IdentityDelete(i))),
        );
        out.extend(self.node_del.into_iter().map(|n| update(Kind::NodeDelete(n))));
        out
    }

    fn policy(
        &mut self,
        old: &BTreeMap<policy::Key, pb::PolicyEntry>,
        new: &BTreeMap<policy::Key, pb::PolicyEntry>,
    ) {
        for (key, e) in new {
            if old.get(key) != Some(e) {
                self.policy_up.push(e.clone());
            }
        }
        for key in old.keys() {
            if !new.contains_key(key) {
                self.policy_del.push(policy_key(key));
            }
        }
    }

    fn workloads(
        &mut self,
        old: &BTreeMap<(String, String), pb::Workload>,
        new: &BTreeMap<(String, String), pb::Workload>,
    ) {
        for (key, w) in new {
            if old.get(key) != Some(w) {
                self.workload_up.push(w.clone());
            }
        }
        for (ns, name) in old.keys() {
            if !new.contains_key(&(ns.clone(), name.clone())) {
                self.workload_del.push(pb::WorkloadRef {
                    namespace: ns.clone(),
                    name: name.clone(),
                });
            }
        }
    }
}

/// The updates that turn `old` into `new` (the whole-view reference the
/// streams' incremental path must agree with).
pub fn diff(old: &NodeView, new: &NodeView) -> Vec<pb::Update> {
    let mut d = Delta::default();
    for (id, i) in &new.identities {
        if old.identities.get(id) != Some(i) {
            d.identity_up.push(i.clone());
        }
    }
    for (name, n) in &new.nodes {
        if old.nodes.get(name) != Some(n) {
            d.node_up.push(n.clone());
        }
    }
    for (cidr, e) in &new.ipcache {
        if old.ipcache.get(cidr) != Some(e) {
            d.ipcache_up.push(e.clone());
        }
    }
    d.ipcache_del = old
        .ipcache
        .keys()
        .filter(|c| !new.ipcache.contains_key(*c))
        .cloned()
        .collect();
    d.identity_del = old
        .identities
        .keys()
        .filter(|i| !new.identities.contains_key(*i))
        .copied()
        .collect();
    d.node_del = old
        .nodes
        .keys()
        .filter(|n| !new.nodes.contains_key(*n))
        .cloned()
        .collect();
    d.workloads(&old.workloads, &new.workloads);
    d.policy(&old.policy, &new.policy);
    d.into_updates()
}

/// What a node's sync stream keeps between changes: the version it has
/// sent and its own part of the registry (the cluster-wide part is read
/// from the [`Cluster`]).
#[derive(Debug, Clone)]
pub struct Stream {
    node: String,
    version: u64,
    local: Local,
}

/// What to send a stream after a registry change.
#[derive(Debug)]
pub enum Outgoing {
    /// The updates that bring the node to the new version (none when its
    /// view did not change).
    Delta(Vec<pb::Update>),
    /// The history does not reach back to the stream's version: send a
    /// whole snapshot ([`Stream::reopen`], then [`Stream::snapshot_page`]).
    Snapshot,
}

/// How far a snapshot has been sent: the section, and the last key sent
/// of it. Sections come in the order receivers need (as [`full`]).
#[derive(Debug, Clone, Default)]
pub struct SnapshotCursor(Section);

#[derive(Debug, Clone)]
enum Section {
    Identities(Option<u32>),
    Nodes(Option<String>),
    Workloads(Option<(String, String)>),
    Ipcache(Option<String>),
    Policy(Option<policy::Key>),
    Done,
}

impl Default for Section {
    fn default() -> Self {
        Section::Identities(None)
    }
}

impl SnapshotCursor {
    pub fn done(&self) -> bool {
        matches!(self.0, Section::Done)
    }
}

/// Where the section continues after a page of `p` entries out of `room`:
/// after its last key when the page was full, else at `then`.
fn continue_after<K: Clone, V>(
    p: &[(&K, &V)],
    room: usize,
    at: impl FnOnce(Option<K>) -> Section,
    then: Section,
) -> Section {
    match p.last() {
        Some((k, _)) if p.len() == room => at(Some((*k).clone())),
        _ => then,
    }
}

/// Up to `n` entries of `map` after `after`, in key order.
fn page<'m, K: Ord, V>(map: &'m BTreeMap<K, V>, after: Option<&K>, n: usize) -> Vec<(&'m K, &'m V)> {
    use std::ops::Bound::{Excluded, Unbounded};
    let lower = after.map_or(Unbounded, Excluded);
    map.range((lower, Unbounded)).take(n).collect()
}

/// [`page`] of a cluster-wide map.
fn shared_page<'m, K: Ord + Clone, V: Clone>(
    map: &'m OrdMap<K, V>,
    after: Option<&K>,
    n: usize,
) -> Vec<(&'m K, &'m V)> {
    use std::ops::Bound::{Excluded, Unbounded};
    let lower = after.map_or(Unbounded, Excluded);
    map.range::<_, K>((lower, Unbounded)).take(n).collect()
}

impl Stream {
    /// A stream for `node`, at `cluster`'s version; a snapshot
    /// ([`Stream::snapshot_page`]) is what to open it with.
    pub fn open(cluster: &Cluster, node: &str) -> Self {
        Stream {
            node: node.to_owned(),
            version: cluster.version,
            local: local_view(cluster, node),
        }
    }

    /// Starts over at `cluster`'s version, for a fresh snapshot.
    pub fn reopen(&mut self, cluster: &Cluster) {
        *self = Stream::open(cluster, &self.node);
    }

    /// The next page of the snapshot, at most `max` upserts: the node's own
    /// part as of the stream's version, the cluster-wide part read from
    /// `cluster` (the newest version, whichever it is now). Once the cursor
    /// is done, [`Stream::advance`] to the newest version completes it.
    pub fn snapshot_page(
        &self,
        cursor: &mut SnapshotCursor,
        cluster: &Cluster,
        max: usize,
    ) -> Vec<pb::Update> {
        let shared = &cluster.shared;
        let mut out = Vec::with_capacity(max.min(UPDATES_PER_MESSAGE));
        loop {
            let room = max - out.len();
            if room == 0 || cursor.done() {
                return out;
            }
            cursor.0 = match std::mem::take(&mut cursor.0) {
                Section::Identities(after) => {
                    let p = shared_page(&shared.identities, after.as_ref(), room);
                    out.extend(p.iter().map(|(_, i)| update(Kind::IdentityUpsert((*i).clone()))));
                    continue_after(&p, room, Section::Identities, Section::Nodes(None))
                }
                Section::Nodes(after) => {
                    let p = shared_page(&shared.nodes, after.as_ref(), room);
                    out.extend(p.iter().map(|(_, n)| update(Kind::NodeUpsert((*n).clone()))));
                    continue_after(&p, room, Section::Nodes, Section::Workloads(None))
                }
                Section::Workloads(after) => {
                    let p = page(&self.local.workloads, after.as_ref(), room);
                    out.extend(p.iter().map(|(_, w)| update(Kind::WorkloadUpsert((*w).clone()))));
                    continue_after(&p, room, Section::Workloads, Section::Ipcache(None))
                }
                Section::Ipcache(after) => {
                    let p = shared_page(&shared.ipcache, after.as_ref(), room);
                    out.extend(p.iter().map(|(_, e)| update(Kind::IpcacheUpsert((*e).clone()))));
                    continue_after(&p, room, Section::Ipcache, Section::Policy(None))
                }
                Section::Policy(after) => {
                    let p = page(&self.local.policy, after.as_ref(), room);
                    out.extend(p.iter().map(|(_, e)| update(Kind::PolicyUpsert((*e).clone()))));
                    continue_after(&p, room, Section::Policy, Section::Done)
                }
                Section::Done => Section::Done,
            };
        }
    }

    /// The whole snapshot from one version, at once (for tests and tools;
    /// streams send it page by page).
    pub fn snapshot(&self, cluster: &Cluster) -> Vec<pb::Update> {
        let mut cursor = SnapshotCursor::default();
        let mut out = Vec::new();
        while !cursor.done() {
            out.extend(self.snapshot_page(&mut cursor, cluster, UPDATES_PER_MESSAGE));
        }
        out
    }

    /// What to send to bring the node from the last version sent to
    /// `cluster`: the cluster-wide keys changed meanwhile and the
    /// difference of its own part; a snapshot when the history does not
    /// reach back far enough.
    pub fn advance(&mut self, cluster: &Cluster) -> Outgoing {
        let Some(changed) = cluster.changed_since(self.version) else {
            return Outgoing::Snapshot;
        };
        let mut d = Delta::default();
        let shared = &cluster.shared;
        for id in &changed.identities {
            match shared.identities.get(id) {
                Some(i) => d.identity_up.push(i.clone()),
                None => d.identity_del.push(*id),
            }
        }
        for name in &changed.nodes {
            match shared.nodes.get(name) {
                Some(n) => d.node_up.push(n.clone()),
                None => d.node_del.push(name.clone()),
            }
        }
        for cidr in &changed.ipcache {
            match shared.ipcache.get(cidr) {
                Some(e) => d.ipcache_up.push(e.clone()),
                None => d.ipcache_del.push(cidr.clone()),
            }
        }
        // Most changes touch a node or two: the others keep their part as
        // it is instead of rebuilding it.
        if changed.touches(&self.node) {
            refresh_local(
                cluster,
                &self.node,
                &mut self.local,
                changed.every_local,
                Some(&mut d),
            );
        }
        self.version = cluster.version;
        Outgoing::Delta(d.into_updates())
    }
}

/// The bundle as a sync update.
pub fn bundle_update(bundle: &keyway_identity::TrustBundle) -> pb::Update {
    update(Kind::Bundle(bundle_message(bundle)))
}

pub fn bundle_message(bundle: &keyway_identity::TrustBundle) -> pb::Bundle {
    pb::Bundle {
        trust_domain: bundle.trust_domain().to_string(),
        sequence: bundle.sequence(),
        x509_authorities: bundle.authorities().iter().map(|c| c.to_vec()).collect(),
        jwks: bundle.jwks().to_vec(),
        refresh_hint_seconds: crate::ca::REFRESH_HINT_SECS,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{NodeRecord, WorkloadRecord};

    fn wl(name: &str, node: &str, identity: u32) -> WorkloadRecord {
        WorkloadRecord {
            namespace: "default".into(),
            name: name.into(),
            service_account: name.into(),
            node: node.into(),
            ips: vec![],
            labels: Default::default(),
            selectors: vec![],
            svid_ttl_secs: None,
            identity,
            spiffe_id: format!("spiffe://td/ns/default/sa/{name}"),
        }
    }

    fn ident(id: u32, name: &str) -> IdentityRecord {
        IdentityRecord {
            id,
            spiffe_id: format!("spiffe://td/ns/default/sa/{name}"),
            namespace: "default".into(),
            service_account: name.into(),
            labels: BTreeMap::from([("app".to_string(), name.to_string())]),
        }
    }

    fn view(snap: &RegistrySnapshot, node: &str) -> NodeView {
        node_view(&Cluster::new(snap.clone(), Default::default()), node)
    }

    /// api (257) on n2 takes 8080/TCP from frontend (256, on n1) only.
    fn two_nodes() -> RegistrySnapshot {
        let mut a = wl("frontend", "n1", 256);
        a.ips = vec!["10.0.1.10".into()];
        let mut b = wl("api", "n2", 257);
        b.ips = vec!["10.0.2.10".into(), "fd00::2".into()];
        let policy: crate::model::policy::PolicySpec = serde_json::from_value(serde_json::json!({
            "endpointSelector": { "matchLabels": { "app": "api" } },
            "ingress": [{
                "authentication": "required",
                "endpoints": [{ "matchLabels": { "app": "frontend" } }],
                "ports": [{ "port": 8080, "protocol": "TCP" }]
            }]
        }))
        .unwrap();
        RegistrySnapshot {
            revision: 1,
            workloads: vec![Arc::new(b), Arc::new(a)],
            identities: vec![ident(256, "frontend"), ident(257, "api")],
            nodes: vec![NodeRecord {
                name: "n2".into(),
                node_id: 7,
                attested_at: 0,
                registration: 0,
                addresses: vec!["192.0.2.2:4250".into()],
            }],
            policies: vec![PolicyRecord {
                namespace: "default".into(),
                name: "api-mtls".into(),
                spec: policy,
            }],
        }
    }

    #[test]
    fn workloads_are_node_scoped_but_every_used_identity_is_sent() {
        let snap = RegistrySnapshot {
            revision: 1,
            workloads: vec![Arc::new(wl("a", "n1", 256)), Arc::new(wl("b", "n2", 257))],
            // 258 has no workload (any more): nobody gets it.
            identities: vec![ident(256, "a"), ident(257, "b"), ident(258, "gone")],
            nodes: vec![],
            policies: vec![],
        };
        for (node, workload) in [("n1", "a"), ("n2", "b")] {
            let v = view(&snap, node);
            let names: Vec<_> = v.workloads.keys().map(|(_, n)| n.as_str()).collect();
            assert_eq!(names, vec![workload]);
            assert_eq!(v.identities.keys().copied().collect::<Vec<_>>(), vec![256, 257]);
            assert_eq!(v.identities[&257].spiffe_id, "spiffe://td/ns/default/sa/b");
        }
        // A node with no workloads still learns every peer identity.
        assert_eq!(view(&snap, "n3").identities.len(), 2);
        assert!(view(&snap, "n3").workloads.is_empty());
    }

    #[test]
    fn the_node_table_carries_every_node_and_its_addresses() {
        let mut snap = two_nodes();
        snap.nodes.push(NodeRecord {
            name: "n1".into(),
            node_id: 3,
            attested_at: 0,
            registration: 0,
            addresses: vec![],
        });
        for node in ["n1", "n2", "n3"] {
            let v = view(&snap, node);
            let got: Vec<_> = v
                .nodes
                .values()
                .map(|n| (n.name.as_str(), n.node_id, n.addresses.clone()))
                .collect();
            assert_eq!(
                got,
                vec![("n1", 3, vec![]), ("n2", 7, vec!["192.0.2.2:4250".to_string()])]
            );
        }
        // A node advertising new addresses is one node upsert for everyone.
        let before = view(&snap, "n2");
        snap.nodes[1].addresses = vec!["192.0.2.1:4250".into(), "[2001:db8::1]:4250".into()];
        let d = diff(&before, &view(&snap, "n2"));
        assert_eq!(d.len(), 1);
        let Some(Kind::NodeUpsert(n)) = &d[0].kind else {
            panic!("expected a node upsert, got {d:?}");
        };
        assert_eq!((n.name.as_str(), n.addresses.len()), ("n1", 2));
    }

    #[test]
    fn deleting_the_last_workload_of_an_identity_deletes_it_everywhere() {
        let mut snap = two_nodes();
        let before: Vec<_> = ["n1", "n2"].iter().map(|n| view(&snap, n)).collect();
        // api (257, on n2) goes; its identity record stays allocated.
        snap.workloads.retain(|w| w.name != "api");
        for (i, node) in ["n1", "n2"].iter().enumerate() {
            let after = view(&snap, node);
            assert!(!after.identities.contains_key(&257));
            let d = diff(&before[i], &after);
            let deleted_identity = d
                .iter()
                .any(|u| matches!(u.kind, Some(Kind::IdentityDelete(257))));
            assert!(deleted_identity, "{node}: {d:?}");
            let deleted_ips = d
                .iter()
                .filter(|u| matches!(u.kind, Some(Kind::IpcacheDelete(_))))
                .count();
            assert_eq!(deleted_ips, 2, "{node}");
            // The workload itself is deleted only where it ran.
            let deleted_workload = d.iter().any(|u| matches!(u.kind, Some(Kind::WorkloadDelete(_))));
            assert_eq!(deleted_workload, *node == "n2", "{node}");
        }
        // n2 loses api's policy entries; n1 keeps frontend's.
        assert!(view(&snap, "n2").policy.is_empty());
        assert!(!view(&snap, "n1").policy.is_empty());
    }

    #[test]
    fn the_ipcache_is_cluster_wide_with_node_ids() {
        let snap = two_nodes();
        for node in ["n1", "n2", "n3"] {
            let v = view(&snap, node);
            let got: Vec<(&str, u32, u32)> = v
                .ipcache
                .values()
                .map(|e| (e.cidr.as_str(), e.identity, e.node_id))
                .collect();
            // n1 has not attested: node id 0.
            assert_eq!(
                got,
                vec![
                    ("10.0.1.10/32", 256, 0),
                    ("10.0.2.10/32", 257, 7),
                    ("fd00::2/128", 257, 7)
                ]
            );
        }
    }

    #[test]
    fn a_node_gets_the_policy_of_its_own_subjects_only() {
        let snap = two_nodes();
        let n1 = view(&snap, "n1");
        let n2 = view(&snap, "n2");
        assert!(n1.policy.keys().all(|k| k.subject == 256));
        assert!(n2.policy.keys().all(|k| k.subject == 257));
        assert!(view(&snap, "n3").policy.is_empty());
        let auth: Vec<_> = n2
            .policy
            .values()
            .filter(|e| !e.authenticated.is_empty())
            .collect();
        assert_eq!(auth.len(), 1);
        assert_eq!(
            auth[0].key,
            Some(pb::PolicyKey {
                subject: 257,
                peer: 256,
                port_block: u32::from(keyway_common::port_block(8080)),
                protocol: 6,
                direction: 0
            })
        );
        // Ingress: exemptions and the rule; egress: default allow and exemptions.
        assert_eq!(n2.policy.len(), 3 + 3);
        assert_eq!(n1.policy.len(), 3 + 3);
    }

    #[test]
    fn a_policy_change_sends_only_the_changed_entries() {
        let mut snap = two_nodes();
        let before = view(&snap, "n2");
        snap.policies[0].spec.ingress.as_mut().unwrap()[0].authentication =
            crate::model::policy::AuthMode::Disabled;
        let after = view(&snap, "n2");
        let d = diff(&before, &after);
        assert_eq!(d.len(), 1);
        let Some(Kind::PolicyUpsert(e)) = &d[0].kind else {
            panic!("expected a policy upsert, got {d:?}");
        };
        assert!(e.authenticated.is_empty());
        // Dropping the policy: default allow comes back, the rule goes, and
        // the delete comes after the upsert.
        snap.policies.clear();
        let d = diff(&after, &view(&snap, "n2"));
        let kinds: Vec<_> = d
            .iter()
            .map(|u| match &u.kind {
                Some(Kind::PolicyUpsert(e)) => format!("upsert {}", e.rule),
                Some(Kind::PolicyDelete(k)) => format!("delete {}/{}", k.peer, k.port_block),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(
            kinds,
            vec![
                format!("upsert {}", crate::policy::DEFAULT_ALLOW),
                "delete 256/32".to_string()
            ]
        );
        // The other node saw nothing change.
        assert!(diff(&view(&two_nodes(), "n1"), &view(&snap, "n1")).is_empty());
    }

    #[test]
    fn ordering_puts_identities_first_and_deletes_last() {
        let empty = NodeView::default();
        let all = view(&two_nodes(), "n2");
        let rank = |u: &pb::Update| match &u.kind {
            Some(Kind::IdentityUpsert(_)) => 0,
            Some(Kind::NodeUpsert(_)) => 1,
            Some(Kind::WorkloadUpsert(_)) => 2,
            Some(Kind::IpcacheUpsert(_)) => 3,
            Some(Kind::PolicyUpsert(_)) => 4,
            Some(Kind::PolicyDelete(_)) => 5,
            Some(Kind::IpcacheDelete(_)) => 6,
            Some(Kind::WorkloadDelete(_)) => 7,
            Some(Kind::IdentityDelete(_)) => 8,
            Some(Kind::NodeDelete(_)) => 9,
            _ => 10,
        };
        for d in [diff(&empty, &all), diff(&all, &empty)] {
            let ranks: Vec<_> = d.iter().map(rank).collect();
            assert!(ranks.is_sorted(), "{ranks:?}");
        }
        assert_eq!(full(&all).len(), diff(&empty, &all).len());
    }

    /// What an agent holds after applying `updates` (as node-agent's
    /// state does: a reset starts from nothing).
    fn receive(held: &mut NodeView, reset: bool, updates: Vec<pb::Update>) {
        if reset {
            *held = NodeView::default();
        }
        for u in updates {
            match u.kind {
                Some(Kind::IdentityUpsert(i)) => {
                    held.identities.insert(i.id, i);
                }
                Some(Kind::IdentityDelete(id)) => {
                    held.identities.remove(&id);
                }
                Some(Kind::NodeUpsert(n)) => {
                    held.nodes.insert(n.name.clone(), n);
                }
                Some(Kind::NodeDelete(n)) => {
                    held.nodes.remove(&n);
                }
                Some(Kind::WorkloadUpsert(w)) => {
                    held.workloads.insert((w.namespace.clone(), w.name.clone()), w);
                }
                Some(Kind::WorkloadDelete(r)) => {
                    held.workloads.remove(&(r.namespace, r.name));
                }
                Some(Kind::IpcacheUpsert(e)) => {
                    held.ipcache.insert(e.cidr.clone(), e);
                }
                Some(Kind::IpcacheDelete(c)) => {
                    held.ipcache.remove(&c);
                }
                Some(Kind::PolicyUpsert(e)) => {
                    let k = e.key.unwrap();
                    let key = policy::Key {
                        subject: k.subject,
                        peer: k.peer,
                        port_block: k.port_block,
                        protocol: k.protocol,
                        direction: k.direction,
                    };
                    held.policy.insert(key, e);
                }
                Some(Kind::PolicyDelete(k)) => {
                    held.policy.retain(|key, _| policy_key(key) != k);
                }
                other => panic!("unexpected update {other:?}"),
            }
        }
    }

    /// A registry that changes a little at every step: workloads come, go,
    /// move between nodes, change address and labels; nodes come and go;
    /// the policy flips.
    fn step(snap: &mut RegistrySnapshot, i: usize) {
        let name = format!("w{}", i % 17);
        let node = format!("n{}", i % 3);
        match i % 5 {
            // Changed in place on its node: a new identity and label. (A
            // name comes back every 17 steps, at i % 5 one, three, zero, two
            // (deleted), four: it exists at three when it was placed at one.)
            3 if i % 2 == 1 && snap.workloads.iter().any(|w| w.name == name) => {
                let w = snap.workloads.iter_mut().find(|w| w.name == name).unwrap();
                let w = Arc::make_mut(w);
                w.identity = 256 + (i % 4) as u32;
                w.labels.insert("v".into(), i.to_string());
            }
            0 | 1 => {
                snap.workloads.retain(|w| w.name != name);
                let mut w = wl(&name, &node, 256 + (i % 4) as u32);
                // Few addresses: two workloads often claim one.
                w.ips = vec![format!("10.0.{}.{}", i % 3, i % 5)];
                snap.workloads.push(Arc::new(w));
            }
            2 => snap.workloads.retain(|w| w.name != name),
            3 => {
                if snap.nodes.iter().any(|n| n.name == node) {
                    snap.nodes.retain(|n| n.name != node);
                } else {
                    snap.nodes.push(NodeRecord {
                        name: node,
                        // A node that comes back may have a new number.
                        node_id: (i % 7 + 1) as u16,
                        attested_at: 0,
                        registration: 0,
                        addresses: vec![format!("192.0.2.{}:4250", i % 7)],
                    });
                }
            }
            _ => {
                let auth = &mut snap.policies[0].spec.ingress.as_mut().unwrap()[0].authentication;
                *auth = if *auth == crate::model::policy::AuthMode::Required {
                    crate::model::policy::AuthMode::Disabled
                } else {
                    crate::model::policy::AuthMode::Required
                };
            }
        }
        snap.workloads.sort_by_key(|w| w.key());
        snap.revision += 1;
    }

    /// The cluster-wide view built from nothing, the plain way: what the
    /// change-by-change upkeep in [`Cluster::next`] must always equal.
    fn shared_from_scratch(records: &RegistrySnapshot) -> Shared {
        let used: BTreeSet<u32> = records.workloads.iter().map(|w| w.identity).collect();
        let mut shared = Shared::default();
        for i in records.identities.iter().filter(|i| used.contains(&i.id)) {
            shared.identities.insert(i.id, identity_message(i));
        }
        for n in &records.nodes {
            shared.nodes.insert(n.name.clone(), node_message(n));
        }
        let mut workloads = records.workloads.clone();
        workloads.sort_by_key(|a| a.key());
        for w in &workloads {
            for cidr in cidrs(w) {
                if shared.ipcache.contains_key(&cidr) {
                    continue; // the first claim keeps it
                }
                let node_id = records
                    .nodes
                    .iter()
                    .find(|n| n.name == w.node)
                    .map_or(0, |n| u32::from(n.node_id));
                shared.ipcache.insert(
                    cidr.clone(),
                    pb::IpcacheEntry {
                        cidr,
                        identity: w.identity,
                        node_id,
                        namespace: w.namespace.clone(),
                        workload: w.name.clone(),
                    },
                );
            }
        }
        shared
    }

    /// The indexes and the cluster-wide view kept up change by change equal
    /// the ones built from nothing.
    fn assert_upkept(cluster: &Cluster, records: &RegistrySnapshot, step: usize) {
        assert_eq!(
            cluster.shared,
            shared_from_scratch(records),
            "step {step}: the cluster-wide view"
        );
        let mut sorted = records.workloads.clone();
        sorted.sort_by_key(|a| a.key());
        for node in ["n0", "n1", "n2", "n9"] {
            let want: Vec<&WorkloadRecord> = sorted.iter().filter(|w| w.node == node).map(|w| &**w).collect();
            assert_eq!(
                cluster.workloads_on(node).collect::<Vec<_>>(),
                want,
                "step {step}: on {node}"
            );
        }
        for w in &sorted {
            let want: Vec<&WorkloadRecord> = sorted
                .iter()
                .filter(|x| x.spiffe_id == w.spiffe_id)
                .map(|x| &**x)
                .collect();
            assert_eq!(
                cluster.workloads_with(&w.spiffe_id).collect::<Vec<_>>(),
                want,
                "step {step}"
            );
        }
    }

    #[test]
    fn streams_end_up_holding_exactly_the_full_view_after_every_change() {
        let mut snap = two_nodes();
        snap.identities = (256..260).map(|id| ident(id, &format!("i{id}"))).collect();
        snap.identities[0].labels = BTreeMap::from([("app".to_string(), "frontend".to_string())]);
        snap.identities[1].labels = BTreeMap::from([("app".to_string(), "api".to_string())]);
        let mut cluster = Cluster::new(snap.clone(), Default::default());
        let nodes = ["n0", "n1", "n2", "n9"];
        let mut streams: Vec<(Stream, NodeView)> = nodes
            .iter()
            .map(|n| {
                let s = Stream::open(&cluster, n);
                let updates = s.snapshot(&cluster);
                assert_eq!(
                    updates,
                    full(&node_view(&cluster, n)),
                    "the paged snapshot is the full view"
                );
                let mut held = NodeView::default();
                receive(&mut held, true, updates);
                (s, held)
            })
            .collect();
        for i in 0..200 {
            step(&mut snap, i);
            cluster = cluster.next(snap.clone(), Default::default());
            assert_upkept(&cluster, &snap, i);
            // Some streams skip versions (a slow stream sees only the last).
            for (k, (stream, held)) in streams.iter_mut().enumerate() {
                if (i + k) % 3 == 0 {
                    continue;
                }
                let before = held.clone();
                let Outgoing::Delta(updates) = stream.advance(&cluster) else {
                    panic!("within the history no snapshot is needed");
                };
                receive(held, false, updates.clone());
                let want = node_view(&cluster, nodes[k]);
                assert_eq!(*held, want, "step {i}, node {}", nodes[k]);
                if before == want {
                    assert!(
                        updates.is_empty(),
                        "an unchanged view is sent nothing: {updates:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_stream_behind_the_history_gets_a_snapshot() {
        let mut snap = two_nodes();
        let mut cluster = Cluster::new(snap.clone(), Default::default());
        let mut stream = Stream::open(&cluster, "n2");
        for i in 0..HISTORY + 1 {
            Arc::make_mut(&mut snap.workloads[0])
                .labels
                .insert("v".into(), i.to_string());
            cluster = cluster.next(snap.clone(), Default::default());
        }
        assert!(matches!(stream.advance(&cluster), Outgoing::Snapshot));
        stream.reopen(&cluster);
        let mut held = NodeView::default();
        receive(&mut held, true, stream.snapshot(&cluster));
        assert_eq!(held, node_view(&cluster, "n2"));
        // And from there on, deltas again.
        Arc::make_mut(&mut snap.workloads[0]).ips = vec!["10.9.9.9".into()];
        cluster = cluster.next(snap.clone(), Default::default());
        assert!(matches!(stream.advance(&cluster), Outgoing::Delta(_)));
    }

    /// A snapshot read page by page while the registry changes under it
    /// (each page from the newest version, as streams read them) holds
    /// exactly the newest view once the changes made meanwhile are applied.
    #[test]
    fn a_snapshot_read_across_changes_is_exact_after_its_catch_up() {
        let mut snap = two_nodes();
        snap.identities = (256..260).map(|id| ident(id, &format!("i{id}"))).collect();
        for i in 0..40 {
            step(&mut snap, i);
        }
        let mut cluster = Cluster::new(snap.clone(), Default::default());
        for (node, page_size) in [("n0", 1), ("n1", 2), ("n2", 3), ("n1", 7)] {
            let mut stream = Stream::open(&cluster, node);
            let mut cursor = SnapshotCursor::default();
            let mut held = NodeView::default();
            let mut reset = true;
            let mut i = 40;
            while !cursor.done() {
                let updates = stream.snapshot_page(&mut cursor, &cluster, page_size);
                assert!(updates.len() <= page_size);
                receive(&mut held, reset, updates);
                reset = false;
                step(&mut snap, i);
                i += 1;
                cluster = cluster.next(snap.clone(), Default::default());
            }
            assert!(i >= 42, "the snapshot spanned several versions");
            let Outgoing::Delta(catch_up) = stream.advance(&cluster) else {
                panic!("within the history");
            };
            receive(&mut held, false, catch_up);
            assert_eq!(held, node_view(&cluster, node), "{node}, pages of {page_size}");
        }
    }

    #[test]
    fn policy_is_compiled_again_only_when_its_inputs_change() {
        let mut snap = two_nodes();
        let cluster = Cluster::new(snap.clone(), Default::default());
        // A new address for an existing identity: same inputs.
        Arc::make_mut(&mut snap.workloads[0]).ips.push("10.0.2.11".into());
        let next = cluster.next(snap.clone(), Default::default());
        assert_eq!(next.compiled_from, cluster.compiled_from);
        assert_eq!(next.policy, cluster.policy);
        assert_eq!(next.version, cluster.version + 1);
        let only_ipcache = next.history.back().unwrap().1.clone();
        assert_eq!(
            *only_ipcache,
            SharedChanges {
                ipcache: BTreeSet::from(["10.0.2.11/32".to_string()]),
                locals: BTreeSet::from(["n2".to_string()]),
                ..Default::default()
            }
        );
    }

    #[test]
    fn a_change_rebuilds_only_the_parts_of_the_nodes_it_touches() {
        let mut snap = two_nodes();
        // A second workload of "frontend", so the identity stays in use.
        snap.workloads.push(Arc::new(wl("frontend-2", "n1", 256)));
        let mut cluster = Cluster::new(snap.clone(), Default::default());
        let v0 = cluster.version;
        let touched = |c: &Cluster, since: u64| -> Vec<&str> {
            let changed = c.changed_since(since).unwrap();
            ["n1", "n2", "n3"]
                .into_iter()
                .filter(|n| changed.touches(n))
                .collect()
        };
        // A new address on n2 (the identity and policy are unchanged).
        Arc::make_mut(&mut snap.workloads[0]).ips.push("10.0.2.11".into());
        cluster = cluster.next(snap.clone(), Default::default());
        assert_eq!(touched(&cluster, v0), vec!["n2"]);
        // "frontend" moves from n1 to n3: both ends, and n2 from before.
        let v1 = cluster.version;
        Arc::make_mut(&mut snap.workloads[1]).node = "n3".into();
        cluster = cluster.next(snap.clone(), Default::default());
        assert_eq!(touched(&cluster, v1), vec!["n1", "n3"]);
        assert_eq!(touched(&cluster, v0), vec!["n1", "n2", "n3"]);
        // Deleted from n3 (its identity is still used on n1).
        let v2 = cluster.version;
        snap.workloads.remove(1);
        cluster = cluster.next(snap.clone(), Default::default());
        assert_eq!(touched(&cluster, v2), vec!["n3"]);
        // A policy change may change any node's entries.
        let v3 = cluster.version;
        snap.policies.clear();
        cluster = cluster.next(snap.clone(), Default::default());
        assert_eq!(touched(&cluster, v3), vec!["n1", "n2", "n3"]);
        // Nothing changed: nothing touched.
        let v4 = cluster.version;
        assert!(touched(&cluster, v4).is_empty());
    }

    #[test]
    fn records_read_back_unchanged_are_shared_with_the_last_version() {
        let old: Vec<Arc<WorkloadRecord>> = vec![Arc::new(wl("a", "n1", 256)), Arc::new(wl("b", "n1", 257))];
        let mut moved = wl("b", "n2", 257);
        moved.ips = vec!["10.0.0.2".into()];
        let mut new = vec![Arc::new(wl("a", "n1", 256)), Arc::new(moved)];
        share_unchanged(&old, &mut new);
        assert!(
            Arc::ptr_eq(&new[0], &old[0]),
            "an unchanged record is the old one"
        );
        assert!(!Arc::ptr_eq(&new[1], &old[1]));
        assert_eq!(new[1].node, "n2", "a changed record is kept as read");
    }

    #[test]
    fn one_change_sends_one_update() {
        let mut snap = RegistrySnapshot {
            revision: 1,
            workloads: (0..100)
                .map(|i| Arc::new(wl(&format!("w{i}"), "n1", 256)))
                .collect(),
            identities: vec![ident(256, "x")],
            nodes: vec![],
            policies: vec![],
        };
        let before = view(&snap, "n1");
        Arc::make_mut(&mut snap.workloads[7])
            .labels
            .insert("version".into(), "2".into());
        let after = view(&snap, "n1");
        let d = diff(&before, &after);
        assert_eq!(d.len(), 1);
        // A new address also reaches the ipcache.
        Arc::make_mut(&mut snap.workloads[7]).ips = vec!["10.0.0.7".into()];
        let with_ip = view(&snap, "n1");
        assert_eq!(diff(&after, &with_ip).len(), 2);
        snap.workloads.remove(7);
        let gone = diff(&with_ip, &view(&snap, "n1"));
        assert!(matches!(gone[0].kind, Some(Kind::IpcacheDelete(_))));
        assert!(matches!(gone[1].kind, Some(Kind::WorkloadDelete(_))));
        assert!(diff(&after, &after).is_empty());
    }
}
