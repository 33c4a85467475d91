//! The admin API on a local unix socket (mode 0600: the file permission is the
//! authentication), used by the CLI subcommands.

use std::path::Path;
use std::time::Duration;

use proto::keyway::admin_server::{Admin, AdminServer};
use proto::keyway::{self as pb};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use crate::ca::Step;
use crate::core::ControlPlane;
use crate::sync;

/// Binds the admin socket with mode 0600 from the start (in a 0700
/// directory when it has to make one), replacing a stale socket file left by
/// a crashed process but never a live one.
pub async fn bind(path: &Path) -> Result<UnixListener, keyway_serve::unix::BindError> {
    keyway_serve::unix::bind(path, 0o600, 0o700)
}

/// What the admin socket allows: only root reaches it, so a handful of
/// connections for the CLI, with the usual clocks.
pub fn limits() -> keyway_serve::Limits {
    keyway_serve::Limits {
        max_connections: 64,
        max_per_peer: 64,
        ..keyway_serve::Limits::default()
    }
}

pub async fn serve(cp: ControlPlane, listener: UnixListener, shutdown: watch::Receiver<bool>) {
    let gate = keyway_serve::Gate::new("admin", limits(), cp.metrics().listeners.clone());
    let routes = tonic::service::Routes::new(AdminServer::new(AdminService { cp }));
    keyway_serve::unix::serve(
        listener,
        gate,
        routes,
        |_, _| std::future::ready(Some((None, ()))),
        shutdown,
    )
    .await;
}

/// A client of the admin socket. Errors say how to fix the connection.
pub async fn connect(path: &Path) -> Result<pb::admin_client::AdminClient<Channel>, String> {
    let owned = path.to_owned();
    if let Err(e) = UnixStream::connect(path).await {
        return Err(format!(
            "cannot reach the control plane's admin socket at {}: {e}\n\
             is `control-plane serve` running? point at its socket with --admin-socket or KEYWAY_ADMIN_SOCKET",
            path.display()
        ));
    }
    let channel =
        Endpoint::from_static("http://keyway-admin")
            .connect_with_connector(tower::service_fn(move |_| {
                let path = owned.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(UnixStream::connect(path).await?))
                }
            }))
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", path.display()))?;
    Ok(pb::admin_client::AdminClient::new(channel))
}

#[derive(Debug)]
struct AdminService {
    cp: ControlPlane,
}

fn ttl(secs: u64, default: Duration) -> Duration {
    if secs == 0 {
        default
    } else {
        Duration::from_secs(secs)
    }
}

impl AdminService {
    fn status(&self) -> pb::CaStatusResponse {
        let authority = self.cp.authority();
        let state = authority.state();
        let next = crate::ca::next_step(state, authority.max_svid_ttl());
        pb::CaStatusResponse {
            authorities: state
                .authorities
                .iter()
                .map(|a| pb::CaInfo {
                    id: a.id.clone(),
                    state: a.phase.as_str().into(),
                    not_before_unix: a.not_before,
                    not_after_unix: a.not_after,
                    upstream_signed: !state.upstream_chain.is_empty(),
                    jwt_key_id: a.jwt_kid.clone(),
                    cert: a.cert_der.clone(),
                })
                .collect(),
            bundle_sequence: state.bundle_sequence,
            next_step: next
                .as_ref()
                .map(|(s, _)| match s {
                    Step::Prepare => "prepare".to_string(),
                    Step::Activate => "activate".to_string(),
                    Step::Retire(id) => format!("retire {id}"),
                })
                .unwrap_or_default(),
            next_step_at_unix: next.map(|(_, at)| at).unwrap_or(0),
        }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn create_join_token(
        &self,
        req: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<pb::CreateJoinTokenResponse>, Status> {
        let req = req.into_inner();
        let (token, expires_at_unix) = self
            .cp
            .create_join_token(&req.node_name, ttl(req.ttl_seconds, Duration::from_secs(600)))
            .await?;
        Ok(Response::new(pb::CreateJoinTokenResponse {
            token,
            expires_at_unix,
        }))
    }

    async fn get_bundle(&self, _req: Request<pb::GetBundleRequest>) -> Result<Response<pb::Bundle>, Status> {
        Ok(Response::new(sync::bundle_message(&self.cp.authority().bundle())))
    }

    async fn mint_x509_svid(
        &self,
        req: Request<pb::MintX509SvidRequest>,
    ) -> Result<Response<pb::MintX509SvidResponse>, Status> {
        let req = req.into_inner();
        let issued = self
            .cp
            .mint_x509(
                &req.spiffe_id,
                &req.csr,
                ttl(req.ttl_seconds, self.cp.config().svid_ttl),
            )
            .await?;
        Ok(Response::new(pb::MintX509SvidResponse {
            cert_chain: issued.chain,
            bundle: Some(sync::bundle_message(&self.cp.authority().bundle())),
        }))
    }

    async fn mint_jwt_svid(
        &self,
        req: Request<pb::MintJwtSvidRequest>,
    ) -> Result<Response<pb::MintJwtSvidResponse>, Status> {
        let req = req.into_inner();
        let (token, expires_at_unix) = self.cp.mint_jwt(
            &req.spiffe_id,
            &req.audience,
            ttl(req.ttl_seconds, self.cp.config().jwt_ttl),
        )?;
        Ok(Response::new(pb::MintJwtSvidResponse {
            token,
            expires_at_unix,
        }))
    }

    async fn ca_status(
        &self,
        _req: Request<pb::CaStatusRequest>,
    ) -> Result<Response<pb::CaStatusResponse>, Status> {
        Ok(Response::new(self.status()))
    }

    async fn ca_prepare(
        &self,
        _req: Request<pb::CaStatusRequest>,
    ) -> Result<Response<pb::CaStatusResponse>, Status> {
        self.cp.rotate(Step::Prepare).await?;
        Ok(Response::new(self.status()))
    }

    async fn ca_activate(
        &self,
        _req: Request<pb::CaStatusRequest>,
    ) -> Result<Response<pb::CaStatusResponse>, Status> {
        self.cp.rotate(Step::Activate).await?;
        Ok(Response::new(self.status()))
    }

    async fn apply(&self, req: Request<pb::ApplyRequest>) -> Result<Response<pb::ApplyResponse>, Status> {
        let outcome = self.cp.apply(&req.into_inner().yaml).await?;
        Ok(Response::new(pb::ApplyResponse {
            changes: outcome.changes,
            revision: outcome.revision,
        }))
    }

    async fn delete(&self, req: Request<pb::ApplyRequest>) -> Result<Response<pb::ApplyResponse>, Status> {
        let outcome = self.cp.delete(&req.into_inner().yaml).await?;
        Ok(Response::new(pb::ApplyResponse {
            changes: outcome.changes,
            revision: outcome.revision,
        }))
    }

    async fn revoke_node(
        &self,
        req: Request<pb::RevokeNodeRequest>,
    ) -> Result<Response<pb::RevokeNodeResponse>, Status> {
        let node = req.into_inner().node_name;
        keyway_identity::spiffe_id::check_name("node name", &node)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if self.cp.config().kubernetes {
            return Err(Status::failed_precondition(
                "this control plane runs in Kubernetes mode: delete the Node (kubectl delete node NAME) to revoke it",
            ));
        }
        if !self.cp.revoke_node(&node).await? {
            return Err(Status::not_found(format!("no attested node named {node}")));
        }
        Ok(Response::new(pb::RevokeNodeResponse {}))
    }

    async fn list_identities(
        &self,
        _req: Request<pb::ListIdentitiesRequest>,
    ) -> Result<Response<pb::ListIdentitiesResponse>, Status> {
        let cluster = self.cp.cluster();
        let reg = &cluster.records;
        let mut by_identity: std::collections::HashMap<u32, Vec<String>> = std::collections::HashMap::new();
        for w in &reg.workloads {
            by_identity
                .entry(w.identity)
                .or_default()
                .push(format!("{} (node {})", w.key(), w.node));
        }
        let identities = reg
            .identities
            .iter()
            .filter_map(|i| {
                let workloads = by_identity.remove(&i.id).unwrap_or_default();
                // Identities no workload references any more are not listed.
                (!workloads.is_empty()).then(|| pb::IdentityInfo {
                    identity: Some(pb::Identity {
                        id: i.id,
                        spiffe_id: i.spiffe_id.clone(),
                        namespace: i.namespace.clone(),
                        service_account: i.service_account.clone(),
                        labels: i.labels.clone().into_iter().collect(),
                    }),
                    workloads,
                })
            })
            .collect();
        Ok(Response::new(pb::ListIdentitiesResponse { identities }))
    }

    async fn list_issuance(
        &self,
        req: Request<pb::ListIssuanceRequest>,
    ) -> Result<Response<pb::ListIssuanceResponse>, Status> {
        let req = req.into_inner();
        let limit = match req.limit {
            0 => 100,
            n => (n as usize).min(10_000),
        };
        let log = self
            .cp
            .store()
            .issuance_log()
            .await
            .map_err(|e| Status::unavailable(format!("cannot read the issuance log: {e}")))?;
        let held = log.len() as u64;
        let mut matching: Vec<_> = log
            .into_iter()
            .filter(|r| req.spiffe_id.is_empty() || r.spiffe_id == req.spiffe_id)
            .filter(|r| req.requester.is_empty() || r.requester == req.requester)
            .filter(|r| req.serial.is_empty() || r.serial.eq_ignore_ascii_case(&req.serial))
            .collect();
        let matched = matching.len() as u64;
        matching.sort_by(|a, b| {
            b.issued_at
                .cmp(&a.issued_at)
                .then_with(|| a.serial.cmp(&b.serial))
        });
        matching.truncate(limit);
        Ok(Response::new(pb::ListIssuanceResponse {
            records: matching
                .into_iter()
                .map(|r| pb::IssuanceEntry {
                    serial: r.serial,
                    spiffe_id: r.spiffe_id,
                    requester: r.requester,
                    ca_id: r.ca_id,
                    issued_at: r.issued_at,
                    not_after: r.not_after,
                })
                .collect(),
            matched,
            held,
        }))
    }
}
