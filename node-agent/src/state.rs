//! The node's view of the control plane, rebuilt from the Sync stream. One
//! task (the control-plane link) owns it and publishes complete, consistent
//! versions through a `watch`.

use std::collections::BTreeMap;
use std::sync::Arc;

use keyway_identity::TrustBundle;
use proto::keyway::{self as pb, update::Kind};

use crate::control_plane::bundle_from;

/// What the control plane told this node, as of `revision`.
#[derive(Debug, Clone, Default)]
pub struct NodeState {
    pub revision: u64,
    /// True once a complete snapshot has been applied.
    pub synced: bool,
    pub workloads: BTreeMap<(String, String), pb::Workload>,
    pub identities: BTreeMap<u32, pb::Identity>,
    pub nodes: BTreeMap<String, pb::Node>,
    pub bundle: Option<Arc<TrustBundle>>,
}

impl NodeState {
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
                // Datapath tables arrive with the datapath.
                Some(_) | None => {}
            }
        }
        self.revision = msg.revision;
        if msg.complete {
            self.synced = true;
        }
        msg.complete
    }

    /// The SPIFFE IDs of workloads on this node, deduplicated, in a stable order.
    pub fn local_spiffe_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.workloads.values().map(|w| w.spiffe_id.clone()).collect();
        ids.sort();
        ids.dedup();
        ids
    }
}
