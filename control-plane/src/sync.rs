//! What each node sees of the registry, and the deltas between two views.
//!
//! A node gets its own workloads, every identity some workload (on any
//! node) uses, the node table with each agent's mutual-auth addresses, the
//! bundle, the cluster-wide ipcache (every workload IP -> identity and node)
//! and the compiled policy entries whose subject runs on it. Other nodes'
//! workloads (names, selectors) are not sent: SVIDs are scoped to where a
//! workload runs, but mutual auth has to map a peer's numeric identity to
//! the SPIFFE ID its certificate must carry, so the identity table is
//! cluster-wide like the ipcache. Views are diffed, so a change to one
//! workload sends what changed, not the world.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use proto::keyway::{self as pb, update::Kind};

use crate::policy::{self, CompiledPolicy};
use crate::store::RegistrySnapshot;

/// Updates per message while streaming a snapshot; keeps every message far
/// below gRPC limits however many identities a node has.
pub const UPDATES_PER_MESSAGE: usize = 256;

/// The registry as every sync stream sees it: the stored records and the
/// policy compiled from them once (not once per node).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Cluster {
    pub records: RegistrySnapshot,
    pub policy: CompiledPolicy,
}

impl Cluster {
    /// Compiles the policy for the identities that have a workload (an
    /// identity nobody uses has no address and needs no entries).
    pub fn new(records: RegistrySnapshot, budget: policy::Budget) -> Self {
        let used: BTreeSet<u32> = records.workloads.iter().map(|w| w.identity).collect();
        let identities: Vec<_> = records
            .identities
            .iter()
            .filter(|i| used.contains(&i.id))
            .cloned()
            .collect();
        let policy = policy::compile(&identities, &records.policies, budget);
        Self { records, policy }
    }
}

/// One node's slice of the registry.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct NodeView {
    /// The workloads placed on this node.
    pub workloads: BTreeMap<(String, String), pb::Workload>,
    /// Cluster-wide: every identity with a workload on some node.
    pub identities: BTreeMap<u32, pb::Identity>,
    pub nodes: BTreeMap<String, pb::Node>,
    /// Cluster-wide, keyed by CIDR (`a.b.c.d/32`, `x::y/128`).
    pub ipcache: BTreeMap<String, pb::IpcacheEntry>,
    /// The entries whose subject has a workload on this node.
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

/// The slice of `cluster` that `node` needs.
pub fn node_view(cluster: &Cluster, node: &str) -> NodeView {
    let snapshot = &cluster.records;
    let mut view = NodeView::default();
    // Identities with a workload here (their policy is this node's to
    // enforce) and anywhere (their SPIFFE IDs are what peers must present).
    let mut local_ids = BTreeSet::new();
    let used_ids: BTreeSet<u32> = snapshot.workloads.iter().map(|w| w.identity).collect();
    for w in snapshot.workloads.iter().filter(|w| w.node == node) {
        local_ids.insert(w.identity);
        view.workloads.insert(
            (w.namespace.clone(), w.name.clone()),
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
            },
        );
    }
    for i in snapshot.identities.iter().filter(|i| used_ids.contains(&i.id)) {
        view.identities.insert(
            i.id,
            pb::Identity {
                id: i.id,
                spiffe_id: i.spiffe_id.clone(),
                namespace: i.namespace.clone(),
                service_account: i.service_account.clone(),
                labels: i.labels.clone().into_iter().collect(),
            },
        );
    }
    for n in &snapshot.nodes {
        view.nodes.insert(
            n.name.clone(),
            pb::Node {
                name: n.name.clone(),
                node_id: u32::from(n.node_id),
                addresses: n.addresses.clone(),
            },
        );
    }
    let node_ids: BTreeMap<&str, u32> = snapshot
        .nodes
        .iter()
        .map(|n| (n.name.as_str(), u32::from(n.node_id)))
        .collect();
    // Workloads come in namespace/name order; if two claim one address the
    // first keeps it.
    for w in &snapshot.workloads {
        for ip in &w.ips {
            let Ok(addr) = ip.parse::<IpAddr>() else {
                continue;
            };
            let cidr = match addr {
                IpAddr::V4(a) => format!("{a}/32"),
                IpAddr::V6(a) => format!("{a}/128"),
            };
            view.ipcache
                .entry(cidr.clone())
                .or_insert_with(|| pb::IpcacheEntry {
                    cidr,
                    identity: w.identity,
                    node_id: node_ids.get(w.node.as_str()).copied().unwrap_or(0),
                    namespace: w.namespace.clone(),
                    workload: w.name.clone(),
                });
        }
    }
    for id in &local_ids {
        for (k, v) in cluster.policy.subject(*id) {
            view.policy.insert(
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
    view
}

fn update(kind: Kind) -> pb::Update {
    pb::Update { kind: Some(kind) }
}

/// Everything in `view`, as upserts (for a snapshot).
pub fn full(view: &NodeView) -> Vec<pb::Update> {
    diff(&NodeView::default(), view)
}

/// The updates that turn `old` into `new`. Identities and nodes are upserted
/// before the workloads, ipcache and policy entries that refer to them, and
/// every delete comes after every upsert (referring entries first), so a
/// receiver never holds an entry whose identity it does not know.
pub fn diff(old: &NodeView, new: &NodeView) -> Vec<pb::Update> {
    let mut out = Vec::new();
    for (id, i) in &new.identities {
        if old.identities.get(id) != Some(i) {
            out.push(update(Kind::IdentityUpsert(i.clone())));
        }
    }
    for (name, n) in &new.nodes {
        if old.nodes.get(name) != Some(n) {
            out.push(update(Kind::NodeUpsert(n.clone())));
        }
    }
    for (key, w) in &new.workloads {
        if old.workloads.get(key) != Some(w) {
            out.push(update(Kind::WorkloadUpsert(w.clone())));
        }
    }
    for (cidr, e) in &new.ipcache {
        if old.ipcache.get(cidr) != Some(e) {
            out.push(update(Kind::IpcacheUpsert(e.clone())));
        }
    }
    for (key, e) in &new.policy {
        if old.policy.get(key) != Some(e) {
            out.push(update(Kind::PolicyUpsert(e.clone())));
        }
    }
    for key in old.policy.keys() {
        if !new.policy.contains_key(key) {
            out.push(update(Kind::PolicyDelete(policy_key(key))));
        }
    }
    for cidr in old.ipcache.keys() {
        if !new.ipcache.contains_key(cidr) {
            out.push(update(Kind::IpcacheDelete(cidr.clone())));
        }
    }
    for (ns, name) in old.workloads.keys() {
        if !new.workloads.contains_key(&(ns.clone(), name.clone())) {
            out.push(update(Kind::WorkloadDelete(pb::WorkloadRef {
                namespace: ns.clone(),
                name: name.clone(),
            })));
        }
    }
    for id in old.identities.keys() {
        if !new.identities.contains_key(id) {
            out.push(update(Kind::IdentityDelete(*id)));
        }
    }
    for name in old.nodes.keys() {
        if !new.nodes.contains_key(name) {
            out.push(update(Kind::NodeDelete(name.clone())));
        }
    }
    out
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
    use crate::store::{IdentityRecord, NodeRecord, PolicyRecord, WorkloadRecord};

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
        let policy: crate::policy::PolicySpec = serde_json::from_value(serde_json::json!({
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
            workloads: vec![b, a],
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
            workloads: vec![wl("a", "n1", 256), wl("b", "n2", 257)],
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
        snap.policies[0].spec.ingress.as_mut().unwrap()[0].authentication = crate::policy::AuthMode::Disabled;
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

    #[test]
    fn one_change_sends_one_update() {
        let mut snap = RegistrySnapshot {
            revision: 1,
            workloads: (0..100).map(|i| wl(&format!("w{i}"), "n1", 256)).collect(),
            identities: vec![ident(256, "x")],
            nodes: vec![],
            policies: vec![],
        };
        let before = view(&snap, "n1");
        snap.workloads[7].labels.insert("version".into(), "2".into());
        let after = view(&snap, "n1");
        let d = diff(&before, &after);
        assert_eq!(d.len(), 1);
        // A new address also reaches the ipcache.
        snap.workloads[7].ips = vec!["10.0.0.7".into()];
        let with_ip = view(&snap, "n1");
        assert_eq!(diff(&after, &with_ip).len(), 2);
        snap.workloads.remove(7);
        let gone = diff(&with_ip, &view(&snap, "n1"));
        assert!(matches!(gone[0].kind, Some(Kind::IpcacheDelete(_))));
        assert!(matches!(gone[1].kind, Some(Kind::WorkloadDelete(_))));
        assert!(diff(&after, &after).is_empty());
    }
}
