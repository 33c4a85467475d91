//! What each node sees of the registry, and the deltas between two views.
//!
//! A node gets its own workloads, their identities, the node table and the
//! bundle; nothing about other nodes' workloads (keys and identities are
//! scoped to where they run). Views are diffed, so a change to one workload
//! sends one update, not the world.

use std::collections::{BTreeMap, BTreeSet};

use proto::keyway::{self as pb, update::Kind};

use crate::store::RegistrySnapshot;

/// Updates per message while streaming a snapshot; keeps every message far
/// below gRPC limits however many identities a node has.
pub const UPDATES_PER_MESSAGE: usize = 256;

/// One node's slice of the registry.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct NodeView {
    pub workloads: BTreeMap<(String, String), pb::Workload>,
    pub identities: BTreeMap<u32, pb::Identity>,
    pub nodes: BTreeMap<String, pb::Node>,
}

/// The slice of `snapshot` that `node` needs.
pub fn node_view(snapshot: &RegistrySnapshot, node: &str) -> NodeView {
    let mut view = NodeView::default();
    let mut ids = BTreeSet::new();
    for w in snapshot.workloads.iter().filter(|w| w.node == node) {
        ids.insert(w.identity);
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
    for i in snapshot.identities.iter().filter(|i| ids.contains(&i.id)) {
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
                addresses: Vec::new(),
            },
        );
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

/// The updates that turn `old` into `new`. Identities are upserted before the
/// workloads that use them and deleted after, so a receiver never holds a
/// workload whose identity it does not know.
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
    use crate::store::{IdentityRecord, WorkloadRecord};

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
            labels: Default::default(),
        }
    }

    #[test]
    fn a_node_sees_only_its_workloads_and_their_identities() {
        let snap = RegistrySnapshot {
            revision: 1,
            workloads: vec![wl("a", "n1", 256), wl("b", "n2", 257)],
            identities: vec![ident(256, "a"), ident(257, "b")],
            nodes: vec![],
        };
        let v = node_view(&snap, "n1");
        assert_eq!(v.workloads.len(), 1);
        assert_eq!(v.identities.keys().copied().collect::<Vec<_>>(), vec![256]);
    }

    #[test]
    fn one_change_sends_one_update() {
        let mut snap = RegistrySnapshot {
            revision: 1,
            workloads: (0..100).map(|i| wl(&format!("w{i}"), "n1", 256)).collect(),
            identities: vec![ident(256, "x")],
            nodes: vec![],
        };
        let before = node_view(&snap, "n1");
        snap.workloads[7].ips = vec!["10.0.0.7".into()];
        let after = node_view(&snap, "n1");
        let d = diff(&before, &after);
        assert_eq!(d.len(), 1);
        snap.workloads.remove(7);
        let gone = diff(&after, &node_view(&snap, "n1"));
        assert!(matches!(gone[0].kind, Some(Kind::WorkloadDelete(_))));
        assert!(diff(&after, &after).is_empty());
    }
}
