//! The node's view of the control plane, rebuilt from the Sync stream. One
//! task (the control-plane link) owns it and publishes complete, consistent
//! versions through a `watch`.

use std::collections::BTreeMap;
use std::sync::Arc;

use keyway_identity::TrustBundle;
use proto::keyway::{self as pb, update::Kind};

use crate::control_plane::bundle_from;

/// A policy entry's key as a tuple, (subject, peer, port block, protocol,
/// direction), ordered like the datapath's lookup key.
pub type PolicyTuple = (u32, u32, u32, u32, u32);

fn policy_tuple(k: &pb::PolicyKey) -> PolicyTuple {
    (k.subject, k.peer, k.port_block, k.protocol, k.direction)
}

/// What an entry allows (ports of its block, or protocols of an any-port
/// entry); `None` when the control plane sent a malformed bitmap.
pub fn allowed(e: &pb::PolicyEntry) -> Option<keyway_common::PortBits> {
    keyway_common::PortBits::from_bytes(&e.allowed)
}

/// What of it needs mutual authentication (an empty field is nothing).
pub fn authenticated(e: &pb::PolicyEntry) -> Option<keyway_common::PortBits> {
    if e.authenticated.is_empty() {
        return Some(keyway_common::PortBits::NONE);
    }
    keyway_common::PortBits::from_bytes(&e.authenticated)
}

/// The entry the control plane sends for one port of a protocol, or, with
/// port 0, for every port of `protocol` (every protocol when that is 0 too),
/// keyed as the agent keeps it. For tests and tools that build node state.
pub fn port_entry(
    (subject, peer, port, protocol, direction): (u32, u32, u32, u32, u32),
    auth: bool,
    rule: &str,
) -> (PolicyTuple, pb::PolicyEntry) {
    use keyway_common::{PortBits, port_block};
    let (block, proto, bits) = if port == 0 {
        let bits = if protocol == 0 {
            PortBits::ALL
        } else {
            let mut b = PortBits::NONE;
            b.set(protocol as u8);
            b
        };
        (0, 0, bits)
    } else {
        let mut b = PortBits::NONE;
        b.set((port & 0xff) as u8);
        (u32::from(port_block(port as u16)), protocol, b)
    };
    let key = (subject, peer, block, proto, direction);
    let entry = pb::PolicyEntry {
        key: Some(pb::PolicyKey {
            subject,
            peer,
            port_block: block,
            protocol: proto,
            direction,
        }),
        rule: rule.to_owned(),
        allowed: bits.to_bytes().to_vec(),
        authenticated: if auth {
            bits.to_bytes().to_vec()
        } else {
            Vec::new()
        },
        r#final: false,
    };
    (key, entry)
}

/// Whether some of what the entry allows needs mutual authentication.
pub fn requires_auth(e: &pb::PolicyEntry) -> bool {
    authenticated(e).is_some_and(|b| !b.is_empty())
}

/// What the control plane told this node, as of `revision`.
#[derive(Debug, Clone, Default)]
pub struct NodeState {
    pub revision: u64,
    /// True once a complete snapshot has been applied.
    pub synced: bool,
    /// The workloads placed on this node (only these get SVIDs here).
    pub workloads: BTreeMap<(String, String), pb::Workload>,
    /// Every numeric identity some workload in the cluster uses, with its
    /// SPIFFE ID: what a peer's certificate must carry. Not a list of what
    /// this node may hold keys for (that is [`NodeState::local_spiffe_ids`]).
    pub identities: BTreeMap<u32, pb::Identity>,
    /// Every attested node by name, with its node id and the addresses its
    /// agent takes mutual-auth handshakes on.
    pub nodes: BTreeMap<String, pb::Node>,
    /// Every workload address in the cluster, keyed by CIDR.
    pub ipcache: BTreeMap<String, pb::IpcacheEntry>,
    /// Compiled policy for the identities with a workload on this node.
    pub policy: BTreeMap<PolicyTuple, pb::PolicyEntry>,
    pub bundle: Option<Arc<TrustBundle>>,
}

impl NodeState {
    /// What the datapath decides for a packet from this state's policy (port
    /// in host order): the most specific matching entry's rule and whether
    /// any matching entry needs authentication; `None` when dropped. The
    /// kernel's lookup order (`keyway_common::policy_probes`) over the
    /// synced entries, for tools and tests.
    pub fn decide(
        &self,
        subject: u32,
        peer: u32,
        port: u16,
        proto: u8,
        direction: u32,
    ) -> Option<(&str, bool)> {
        let mut found: Option<&str> = None;
        let mut auth = false;
        for (_, k, bit) in keyway_common::policy_probes(subject, peer, port, proto, direction as u8) {
            let key = (
                k.subject,
                k.peer,
                u32::from(k.port_block),
                u32::from(k.proto),
                direction,
            );
            let Some(e) = self.policy.get(&key) else {
                continue;
            };
            if allowed(e).is_some_and(|b| b.get(bit)) {
                found.get_or_insert(e.rule.as_str());
                auth |= authenticated(e).is_some_and(|b| b.get(bit));
            }
            if e.r#final {
                break;
            }
        }
        found.map(|r| (r, auth))
    }

    /// Applies one Sync message. Returns true when the state is complete
    /// and consistent afterwards (worth publishing).
    pub fn apply(&mut self, msg: pb::SyncResponse) -> bool {
        if msg.reset {
            let bundle = self.bundle.take();
            *self = NodeState {
                bundle,
                ..Default::default()
            };
        }
        for update in msg.updates {
            match update.kind {
                Some(Kind::WorkloadUpsert(w)) => {
                    self.workloads.insert((w.namespace.clone(), w.name.clone()), w);
                }
                Some(Kind::WorkloadDelete(r)) => {
                    self.workloads.remove(&(r.namespace, r.name));
                }
                Some(Kind::IdentityUpsert(i)) => {
                    self.identities.insert(i.id, i);
                }
                Some(Kind::IdentityDelete(id)) => {
                    self.identities.remove(&id);
                }
                Some(Kind::NodeUpsert(n)) => {
                    self.nodes.insert(n.name.clone(), n);
                }
                Some(Kind::NodeDelete(n)) => {
                    self.nodes.remove(&n);
                }
                Some(Kind::Bundle(b)) => match bundle_from(&b) {
                    Ok(bundle) => {
                        let newer = self
                            .bundle
                            .as_ref()
                            .is_none_or(|cur| cur.sequence() < bundle.sequence());
                        if newer {
                            self.bundle = Some(Arc::new(bundle));
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "ignoring an unusable bundle from the control plane")
                    }
                },
                Some(Kind::IpcacheUpsert(e)) => {
                    self.ipcache.insert(e.cidr.clone(), e);
                }
                Some(Kind::IpcacheDelete(cidr)) => {
                    self.ipcache.remove(&cidr);
                }
                Some(Kind::PolicyUpsert(e)) => match &e.key {
                    Some(k) => {
                        self.policy.insert(policy_tuple(k), e);
                    }
                    None => tracing::warn!(rule = %e.rule, "ignoring a policy entry without a key"),
                },
                Some(Kind::PolicyDelete(k)) => {
                    self.policy.remove(&policy_tuple(&k));
                }
                None => {}
            }
        }
        self.revision = msg.revision;
        if msg.complete {
            self.synced = true;
        }
        msg.complete
    }

    /// The SPIFFE IDs of workloads on this node, deduplicated, in a stable
    /// order: the identities this node holds keys for. Taken from the
    /// workloads, never from `identities` (which is cluster-wide).
    pub fn local_spiffe_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.workloads.values().map(|w| w.spiffe_id.clone()).collect();
        ids.sort();
        ids.dedup();
        ids
    }

    /// The SPIFFE ID behind a numeric identity, wherever its workloads run.
    pub fn spiffe_id_of(&self, identity: u32) -> Option<&str> {
        self.identities.get(&identity).map(|i| i.spiffe_id.as_str())
    }

    /// The node with a node id (as the ipcache and auth map name it).
    pub fn node_by_id(&self, node_id: u32) -> Option<&pb::Node> {
        self.nodes.values().find(|n| n.node_id == node_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upd(kind: Kind) -> pb::Update {
        pb::Update { kind: Some(kind) }
    }

    fn msg(reset: bool, complete: bool, updates: Vec<pb::Update>) -> pb::SyncResponse {
        pb::SyncResponse {
            revision: 1,
            reset,
            updates,
            complete,
        }
    }

    fn key(subject: u32, peer: u32, port: u32) -> pb::PolicyKey {
        entry(subject, peer, port, false).key.expect("keyed")
    }

    fn entry(subject: u32, peer: u32, port: u32, auth: bool) -> pb::PolicyEntry {
        port_entry((subject, peer, port, 6, 0), auth, "default/p ingress[0]").1
    }

    fn ip(cidr: &str, identity: u32) -> pb::IpcacheEntry {
        pb::IpcacheEntry {
            cidr: cidr.into(),
            identity,
            node_id: 2,
            ..Default::default()
        }
    }

    fn workload(name: &str, identity: u32) -> pb::Workload {
        pb::Workload {
            namespace: "default".into(),
            name: name.into(),
            identity,
            spiffe_id: format!("spiffe://td/ns/default/sa/{name}"),
            ..Default::default()
        }
    }

    fn identity(id: u32, name: &str) -> pb::Identity {
        pb::Identity {
            id,
            spiffe_id: format!("spiffe://td/ns/default/sa/{name}"),
            ..Default::default()
        }
    }

    #[test]
    fn remote_identities_and_nodes_are_known_but_not_local() {
        let mut s = NodeState::default();
        s.apply(msg(
            true,
            true,
            vec![
                upd(Kind::IdentityUpsert(identity(256, "web"))),
                upd(Kind::IdentityUpsert(identity(257, "db"))),
                upd(Kind::NodeUpsert(pb::Node {
                    name: "node-b".into(),
                    node_id: 2,
                    addresses: vec!["10.0.0.2:4250".into()],
                })),
                upd(Kind::WorkloadUpsert(workload("web", 256))),
            ],
        ));
        // Keys only for what runs here; SPIFFE IDs for every peer.
        assert_eq!(s.local_spiffe_ids(), vec!["spiffe://td/ns/default/sa/web"]);
        assert_eq!(s.spiffe_id_of(257), Some("spiffe://td/ns/default/sa/db"));
        assert_eq!(s.spiffe_id_of(300), None);
        let b = s.node_by_id(2).expect("node 2");
        assert_eq!(
            (b.name.as_str(), b.addresses.as_slice()),
            ("node-b", &["10.0.0.2:4250".to_string()][..])
        );
        assert!(s.node_by_id(3).is_none());

        // An address change replaces the node; a delete forgets identity and node.
        s.apply(msg(
            false,
            true,
            vec![
                upd(Kind::NodeUpsert(pb::Node {
                    name: "node-b".into(),
                    node_id: 2,
                    addresses: vec!["10.0.0.22:4250".into()],
                })),
                upd(Kind::IdentityDelete(257)),
            ],
        ));
        assert_eq!(s.nodes["node-b"].addresses, vec!["10.0.0.22:4250"]);
        assert_eq!(s.spiffe_id_of(257), None);
        s.apply(msg(false, true, vec![upd(Kind::NodeDelete("node-b".into()))]));
        assert!(s.node_by_id(2).is_none());
    }

    #[test]
    fn ipcache_and_policy_follow_upserts_deletes_and_resets() {
        let mut s = NodeState::default();
        assert!(!s.apply(msg(
            true,
            false,
            vec![
                upd(Kind::IpcacheUpsert(ip("10.0.0.1/32", 256))),
                upd(Kind::IpcacheUpsert(ip("10.0.0.2/32", 257))),
            ],
        )));
        assert!(s.apply(msg(
            false,
            true,
            vec![
                upd(Kind::PolicyUpsert(entry(257, 256, 8080, true))),
                upd(Kind::PolicyUpsert(entry(257, 0, 0, false))),
            ],
        )));
        assert!(s.synced);
        assert_eq!(s.ipcache.len(), 2);
        assert_eq!(s.ipcache["10.0.0.2/32"].identity, 257);
        assert!(requires_auth(&s.policy[&(257, 256, 32, 6, 0)]));

        // An upsert replaces, a delete removes.
        s.apply(msg(
            false,
            true,
            vec![
                upd(Kind::IpcacheUpsert(ip("10.0.0.2/32", 258))),
                upd(Kind::IpcacheDelete("10.0.0.1/32".into())),
                upd(Kind::PolicyUpsert(entry(257, 256, 8080, false))),
                upd(Kind::PolicyDelete(key(257, 0, 0))),
            ],
        ));
        assert_eq!(s.ipcache.keys().collect::<Vec<_>>(), vec!["10.0.0.2/32"]);
        assert_eq!(s.ipcache["10.0.0.2/32"].identity, 258);
        assert_eq!(
            s.policy.keys().copied().collect::<Vec<_>>(),
            vec![(257, 256, 32, 6, 0)]
        );
        assert!(!requires_auth(&s.policy[&(257, 256, 32, 6, 0)]));

        // A new snapshot starts from nothing.
        s.apply(msg(
            true,
            true,
            vec![upd(Kind::IpcacheUpsert(ip("10.0.0.9/32", 300)))],
        ));
        assert_eq!(s.ipcache.len(), 1);
        assert!(s.policy.is_empty());
    }
}
