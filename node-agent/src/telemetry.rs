//! What the agent's `/metrics` and `/readyz` read: the one registry every
//! subsystem registers its own metric families in (`agent`, `workload_api`,
//! `mutual_auth::metrics`, `datapath::metrics`, the listeners), and the
//! readiness components. A leaf: it knows no subsystem; which components
//! there are and when each is ready is the agent's business
//! ([`crate::agent::READY_NODE_SVID`] and the rest).

use std::sync::Arc;

use keyway_serve::telemetry::{Readiness, Registry};

/// The registry, readiness and listener metrics of one agent. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Telemetry {
    pub registry: Arc<Registry>,
    pub readiness: Arc<Readiness>,
    /// Every listener's connections, refusals and closes.
    pub listeners: keyway_serve::ListenerMetrics,
}

impl Telemetry {
    /// A registry of its own, with readiness waiting for `components`
    /// (an agent's: [`crate::agent::READY_COMPONENTS`]).
    pub fn new(components: &[&str]) -> Self {
        let registry = Registry::new();
        Self {
            listeners: keyway_serve::ListenerMetrics::register(&registry),
            readiness: Readiness::new(components),
            registry,
        }
    }
}
