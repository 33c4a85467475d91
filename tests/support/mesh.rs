//! Node agents with mutual authentication, in this process: each has its
//! own auth port on 127.0.0.1 (advertised to the control plane), an
//! in-memory auth map (no kernel needed; the privileged tests use the pinned
//! one) and a signal channel the test drives.

use std::sync::Arc;

use node_agent::datapath::{MemoryAuthMap, MissingAuth};
use node_agent::mutual_auth::{self, MutualAuthConfig, MutualAuthHandles};
use tokio::sync::{mpsc, watch};

use crate::{Agent, InProcess};

#[allow(missing_debug_implementations, reason = "test harness")]
pub struct MeshAgent {
    pub agent: Agent,
    pub auth: Arc<MemoryAuthMap>,
    pub mutual: MutualAuthHandles,
    pub signals: mpsc::Sender<MissingAuth>,
    stop: watch::Sender<bool>,
}

impl MeshAgent {
    pub async fn start(cp: &InProcess, node: &str) -> MeshAgent {
        Self::start_with(cp, node, |_| {}).await
    }

    pub async fn start_with(
        cp: &InProcess,
        node: &str,
        tune: impl FnOnce(&mut MutualAuthConfig),
    ) -> MeshAgent {
        let listener = mutual_auth::bind("127.0.0.1:0".parse().unwrap())
            .await
            .expect("auth port");
        let advertised = listener.local_addr().unwrap().to_string();
        let token = cp.token(node).await;
        let agent = Agent::start_full(
            &cp.addr,
            &cp.bundle().to_pem(),
            node,
            Some(token),
            None,
            vec![advertised],
        )
        .await;
        let auth = Arc::new(MemoryAuthMap::default());
        let (signals, rx) = mpsc::channel(64);
        let (stop, stop_rx) = watch::channel(false);
        let mut cfg = MutualAuthConfig::new(node);
        tune(&mut cfg);
        let mutual = mutual_auth::start(
            cfg,
            listener,
            agent.handles.state.clone(),
            agent.handles.svids.clone(),
            auth.clone(),
            Some(rx),
            stop_rx,
        )
        .expect("mutual auth");
        MeshAgent {
            agent,
            auth,
            mutual,
            signals,
            stop,
        }
    }

    /// Waits until the agent's auth entries satisfy `pred`.
    pub async fn wait_entries(
        &self,
        what: &str,
        deadline: std::time::Duration,
        pred: impl Fn(&[mutual_auth::AuthRecord]) -> bool,
    ) -> Arc<Vec<mutual_auth::AuthRecord>> {
        let mut rx = self.mutual.entries.clone();
        let r = tokio::time::timeout(deadline, rx.wait_for(|e| pred(e)))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "timed out after {deadline:?} waiting for {what}: {:?}",
                    self.mutual.entries.borrow()
                )
            });
        r.expect("manager running").clone()
    }

    pub async fn stop(self) {
        let _ = self.stop.send(true);
        self.agent.stop().await;
    }
}
