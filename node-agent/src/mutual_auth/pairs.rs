//! Which identity pairs this node must hold authenticated, and which auth
//! entries are still justified. Pure functions of the node's Sync state, so
//! the rules are tested without sockets or a kernel.

use std::collections::{BTreeMap, BTreeSet};

use keyway_common::{AuthKey, auth_type, identity};

use crate::state::NodeState;

/// The auth key for (local, remote, remote node): the kernel's
/// ([`keyway_common::auth_key`]), for a peer whose node is known.
pub fn key(local: u32, remote: u32, remote_node: u16) -> AuthKey {
    keyway_common::auth_key(local, remote, remote_node, remote_node)
}

/// This node's id, once the control plane has told it.
pub fn local_node_id(state: &NodeState, node_name: &str) -> Option<u16> {
    state
        .nodes
        .get(node_name)
        .and_then(|n| u16::try_from(n.node_id).ok())
        .filter(|id| *id != 0)
}

/// Identities with a workload on this node.
pub fn local_identities(state: &NodeState, node_name: &str) -> BTreeSet<u32> {
    state
        .workloads
        .values()
        .filter(|w| w.node == node_name)
        .map(|w| w.identity)
        .collect()
}

/// Where each identity runs (node ids), from the ipcache.
pub fn placement(state: &NodeState) -> BTreeMap<u32, BTreeSet<u16>> {
    let mut out: BTreeMap<u32, BTreeSet<u16>> = BTreeMap::new();
    for e in state.ipcache.values() {
        if let Ok(node) = u16::try_from(e.node_id)
            && node != 0
        {
            out.entry(e.identity).or_default().insert(node);
        }
    }
    out
}

/// True when some allowing policy entry of this node requires
/// authentication between `local` (the subject) and `remote` (by name or by
/// the any-peer wildcard).
pub fn auth_required(state: &NodeState, local: u32, remote: u32) -> bool {
    let lo = (local, 0, 0, 0, 0);
    let hi = (local, u32::MAX, u32::MAX, u32::MAX, u32::MAX);
    state.policy.range(lo..=hi).any(|(&(_, peer, ..), e)| {
        crate::state::requires_auth(e) && (peer == remote || peer == identity::UNKNOWN)
    })
}

/// What the pair rules consult, computed once per state (placement walks
/// the whole ipcache; the manager checks every entry on every event).
#[derive(Debug, Clone, Default)]
pub struct View {
    local: BTreeSet<u32>,
    placement: BTreeMap<u32, BTreeSet<u16>>,
    my_node: Option<u16>,
    node_ids: BTreeSet<u16>,
}

impl View {
    pub fn new(state: &NodeState, node_name: &str) -> View {
        View {
            local: local_identities(state, node_name),
            placement: placement(state),
            my_node: local_node_id(state, node_name),
            node_ids: state
                .nodes
                .values()
                .filter_map(|n| u16::try_from(n.node_id).ok())
                .collect(),
        }
    }

    /// The pairs a local workload will need before its first packet: every
    /// allowing, auth-requiring policy entry naming a specific peer, times
    /// every node where that peer runs. (Wildcard peers cannot be known in
    /// advance; datapath signals cover them on demand.)
    pub fn wanted(&self, state: &NodeState) -> BTreeSet<AuthKey> {
        let mut out = BTreeSet::new();
        for (&(subject, peer, ..), e) in &state.policy {
            let names_a_local_pair = crate::state::requires_auth(e) && self.local.contains(&subject);
            if !names_a_local_pair || identity::is_reserved(peer) {
                continue;
            }
            for node in self.placement.get(&peer).into_iter().flatten() {
                out.insert(key(subject, peer, *node));
            }
        }
        out
    }

    /// Why an auth entry may not (or no longer) stay in the map; `None` when
    /// it is justified: the local identity still runs here, the remote
    /// identity still runs on that node, the node is known, and policy still
    /// requires auth for the pair.
    pub fn unjustified(&self, state: &NodeState, k: &AuthKey) -> Option<&'static str> {
        if k.auth_type != auth_type::MTLS_SPIFFE {
            return Some("unknown auth type");
        }
        if !self.local.contains(&k.local_id) {
            return Some("the local identity has no workload on this node");
        }
        if !state.identities.contains_key(&k.remote_id) {
            return Some("the remote identity is gone");
        }
        let on_node = self
            .placement
            .get(&k.remote_id)
            .is_some_and(|nodes| nodes.contains(&k.remote_node_id));
        if !on_node {
            return Some("the remote identity no longer runs on that node");
        }
        if self.my_node != Some(k.remote_node_id) && !self.node_ids.contains(&k.remote_node_id) {
            return Some("the remote node is gone");
        }
        if !auth_required(state, k.local_id, k.remote_id) {
            return Some("no policy requires authentication for the pair");
        }
        None
    }

    pub fn local_node_id(&self) -> Option<u16> {
        self.my_node
    }

    pub fn local(&self) -> &BTreeSet<u32> {
        &self.local
    }
}

/// [`View::wanted`] for a one-off question.
pub fn wanted(state: &NodeState, node_name: &str) -> BTreeSet<AuthKey> {
    View::new(state, node_name).wanted(state)
}

/// [`View::unjustified`] for a one-off question.
pub fn unjustified(state: &NodeState, node_name: &str, k: &AuthKey) -> Option<&'static str> {
    View::new(state, node_name).unjustified(state, k)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::keyway as pb;

    const ME: &str = "node-a";

    fn state() -> NodeState {
        let mut s = NodeState::default();
        for (name, id) in [("node-a", 1), ("node-b", 2)] {
            s.nodes.insert(
                name.into(),
                pb::Node {
                    name: name.into(),
                    node_id: id,
                    addresses: vec![],
                },
            );
        }
        s.workloads.insert(
            ("default".into(), "frontend".into()),
            pb::Workload {
                name: "frontend".into(),
                namespace: "default".into(),
                node: ME.into(),
                identity: 300,
                ips: vec!["10.0.1.1".into()],
                ..Default::default()
            },
        );
        for (ip, id, node) in [("10.0.1.1", 300, 1), ("10.0.2.1", 301, 2), ("10.0.1.9", 301, 1)] {
            s.ipcache.insert(
                format!("{ip}/32"),
                pb::IpcacheEntry {
                    cidr: format!("{ip}/32"),
                    identity: id,
                    node_id: node,
                    ..Default::default()
                },
            );
        }
        for id in [300, 301, 302] {
            s.identities.insert(
                id,
                pb::Identity {
                    id,
                    ..Default::default()
                },
            );
        }
        {
            let (k, e) = crate::state::port_entry((300, 301, 8080, 6, 1), true, "default/api egress[0]");
            s.policy.insert(k, e);
        }
        {
            let (k, e) = crate::state::port_entry((300, 302, 0, 0, 1), false, "default/other egress[0]");
            s.policy.insert(k, e);
        }
        s
    }

    #[test]
    fn wanted_pairs_cover_every_node_the_peer_runs_on() {
        let w = wanted(&state(), ME);
        assert_eq!(w, [key(300, 301, 1), key(300, 301, 2)].into_iter().collect());
    }

    #[test]
    fn pairs_without_auth_or_with_reserved_peers_are_not_wanted() {
        let mut s = state();
        {
            let (k, e) = crate::state::port_entry((300, identity::WORLD, 0, 0, 1), true, "x");
            s.policy.insert(k, e);
        }
        assert!(wanted(&s, ME).iter().all(|k| k.remote_id == 301));
    }

    #[test]
    fn entries_lose_their_justification_with_what_justified_them() {
        let k = key(300, 301, 2);
        assert_eq!(unjustified(&state(), ME, &k), None);

        let mut s = state();
        s.workloads.clear();
        assert!(unjustified(&s, ME, &k).unwrap().contains("local identity"));

        let mut s = state();
        s.ipcache.remove("10.0.2.1/32");
        assert!(unjustified(&s, ME, &k).unwrap().contains("no longer runs"));

        let mut s = state();
        s.identities.remove(&301);
        assert!(
            unjustified(&s, ME, &k)
                .unwrap()
                .contains("remote identity is gone")
        );

        let mut s = state();
        s.nodes.remove("node-b");
        assert!(unjustified(&s, ME, &k).unwrap().contains("node is gone"));

        let mut s = state();
        s.policy
            .get_mut(&(300, 301, 32, 6, 1))
            .unwrap()
            .authenticated
            .clear();
        assert!(unjustified(&s, ME, &k).unwrap().contains("no policy"));
    }

    #[test]
    fn a_wildcard_peer_rule_justifies_on_demand_pairs() {
        let mut s = state();
        s.policy.clear();
        {
            let (k, e) = crate::state::port_entry((300, 0, 0, 0, 0), true, "any");
            s.policy.insert(k, e);
        }
        assert!(wanted(&s, ME).is_empty(), "nothing to pre-authenticate");
        assert_eq!(
            unjustified(&s, ME, &key(300, 301, 2)),
            None,
            "but a signal may be acted on"
        );
    }
}
