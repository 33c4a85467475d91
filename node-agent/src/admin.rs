//! The agent's local admin API (`keyway.v1.AgentAdmin`) on a unix socket,
//! mode 0600: the file permission is the authentication, as for the control
//! plane's admin socket.

use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use proto::keyway::{self as pb, agent_admin_server::AgentAdminServer};
use tokio::net::UnixListener;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::datapath::lookup::PinnedLookup;
use crate::datapath::monotonic_ns;
use crate::explain;
use crate::flows::{self, FlowLog};
use crate::mutual_auth::AuthRecord;
use crate::state::NodeState;

/// Not beside the Workload API socket: workloads mount that directory, and
/// this socket shows every flow on the node. Its own directory is 0700.
pub const DEFAULT_SOCKET: &str = "/run/keyway/admin/agent-admin.sock";

/// Binds `path` with mode 0600 from the start (a missing directory is made
/// 0700), replacing a stale socket but never a live one.
pub async fn bind(path: &Path) -> Result<UnixListener, String> {
    keyway_serve::unix::bind(path, 0o600, 0o700).map_err(|e| format!("--admin-socket: {e}"))
}

/// What the admin API reads.
#[derive(Debug, Clone)]
pub struct AdminState {
    pub state: watch::Receiver<Arc<NodeState>>,
    pub auth: watch::Receiver<Arc<Vec<AuthRecord>>>,
    pub datapath: bool,
    /// Flow capture (present with the datapath).
    pub flows: Option<Arc<FlowLog>>,
    /// Where the datapath's maps are pinned (present with the datapath),
    /// for `explain`, which reads what the kernel reads.
    pub pin_dir: Option<std::path::PathBuf>,
}

pub fn serve(
    listener: UnixListener,
    admin: AdminState,
    listeners: keyway_serve::ListenerMetrics,
    shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    // Only root reaches the socket: a handful of connections for the CLI.
    let gate = keyway_serve::Gate::new(
        "agent_admin",
        keyway_serve::Limits {
            max_connections: 64,
            max_per_peer: 64,
            ..keyway_serve::Limits::default()
        },
        listeners,
    );
    let routes = tonic::service::Routes::new(AgentAdminServer::new(Service(admin)));
    tokio::spawn(keyway_serve::unix::serve(
        listener,
        gate,
        routes,
        |_, _| std::future::ready(Some((None, ()))),
        shutdown,
    ))
}

#[derive(Debug)]
struct Service(AdminState);

fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The entries with names from the node's state.
pub fn auth_entries(state: &NodeState, records: &[AuthRecord]) -> Vec<pb::AuthEntry> {
    let spiffe = |id: u32| {
        state
            .identities
            .get(&id)
            .map(|i| i.spiffe_id.clone())
            .unwrap_or_default()
    };
    let node_name = |id: u16| {
        state
            .nodes
            .values()
            .find(|n| n.node_id == u32::from(id))
            .map(|n| n.name.clone())
            .unwrap_or_default()
    };
    crate::mutual_auth::sorted(records)
        .into_values()
        .map(|r| pb::AuthEntry {
            local_identity: r.key.local_id,
            local_spiffe_id: spiffe(r.key.local_id),
            remote_identity: r.key.remote_id,
            remote_spiffe_id: spiffe(r.key.remote_id),
            remote_node_id: u32::from(r.key.remote_node_id),
            remote_node: node_name(r.key.remote_node_id),
            expires_unix: unix(r.expiry),
            authenticated_unix: unix(r.authenticated_at),
            via: r.via.as_str().to_string(),
        })
        .collect()
}

#[tonic::async_trait]
impl pb::agent_admin_server::AgentAdmin for Service {
    type ObserveStream = tokio_stream::wrappers::ReceiverStream<Result<pb::FlowRecord, Status>>;

    async fn observe(
        &self,
        req: Request<pb::ObserveRequest>,
    ) -> Result<Response<Self::ObserveStream>, Status> {
        let q = req.into_inner();
        let log = self.0.flows.clone().ok_or_else(|| {
            Status::failed_precondition("this agent runs without --datapath: there are no flows to observe")
        })?;
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let (past, mut live) = log.snapshot_and_subscribe();
        tokio::spawn(async move {
            for r in past.into_iter().filter(|r| flows::matches(&q, r)) {
                if tx.send(Ok(r)).await.is_err() {
                    return;
                }
            }
            if !q.follow {
                return;
            }
            loop {
                match live.recv().await {
                    Ok(r) if flows::matches(&q, &r) => {
                        if tx.send(Ok(r)).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(_) => return,
                }
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    async fn explain(
        &self,
        req: Request<pb::ExplainRequest>,
    ) -> Result<Response<pb::ExplainResponse>, Status> {
        let q = req.into_inner();
        let pin_dir = self.0.pin_dir.clone().ok_or_else(|| {
            Status::failed_precondition(
                "this agent runs without --datapath: nothing judges traffic on this node",
            )
        })?;
        let state = self.0.state.borrow().clone();
        if !state.synced {
            return Err(Status::unavailable(
                "the agent has not completed its first sync with the control plane yet",
            ));
        }
        let proto =
            explain::parse_protocol(&q.protocol).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let port = u16::try_from(q.port)
            .map_err(|_| Status::invalid_argument(format!("--port {}: not a port number", q.port)))?;
        let records = self.0.auth.borrow().clone();
        let via = records.iter().map(|r| (r.key, r.via.as_str())).collect();
        let tables = PinnedLookup::open(&pin_dir).map_err(|e| Status::unavailable(e.to_string()))?;
        let cx = explain::Context {
            state: &state,
            via: &via,
            now_ns: monotonic_ns(),
        };
        let via = if q.via.is_empty() {
            None
        } else {
            let ifindex = crate::datapath::sys::ifindex(&q.via).ok_or_else(|| {
                Status::invalid_argument(format!("--via {}: no such interface on this node", q.via))
            })?;
            Some(explain::Via {
                name: q.via.clone(),
                ifindex,
            })
        };
        match explain::explain(&cx, &tables, &q.from, &q.to, port, proto, via.as_ref()) {
            Ok(r) => Ok(Response::new(r)),
            Err(e @ explain::ExplainError::Datapath(_)) => Err(Status::unavailable(e.to_string())),
            Err(e) => Err(Status::invalid_argument(e.to_string())),
        }
    }

    async fn list_auth(
        &self,
        _: Request<pb::ListAuthRequest>,
    ) -> Result<Response<pb::ListAuthResponse>, Status> {
        let state = self.0.state.borrow().clone();
        let records = self.0.auth.borrow().clone();
        Ok(Response::new(pb::ListAuthResponse {
            entries: auth_entries(&state, &records),
            datapath: self.0.datapath,
        }))
    }
}

/// A client of the admin socket. Errors say how to fix the connection.
pub async fn connect(
    path: &Path,
) -> Result<pb::agent_admin_client::AgentAdminClient<tonic::transport::Channel>, String> {
    let channel = crate::workload_client::unix_channel(path).await.map_err(|e| {
        format!(
            "cannot reach the agent's admin socket at {}: {e}: is `node-agent run` running? \
             set --admin-socket or KEYWAY_AGENT_ADMIN_SOCKET",
            path.display()
        )
    })?;
    Ok(pb::agent_admin_client::AgentAdminClient::new(channel))
}
