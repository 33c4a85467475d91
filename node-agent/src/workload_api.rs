//! The SPIFFE Workload API on a unix socket (EP-*, WL-*).
//!
//! Callers are identified out of band (EP-10): the socket's peer credentials
//! give a pid and uid, the pid gives the network namespace (and, in
//! Kubernetes, the pod), and those are matched against the selectors of the
//! Workloads placed on this node. Streams are built lazily from `watch`
//! channels: a message is produced only when the client reads, so a client
//! that never reads costs one pending message, not a growing queue.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use futures::Stream;
use keyway_serve::telemetry::Registry;
use prometheus_client::metrics::gauge::Gauge;
use proto::workload::spiffe_workload_api_server::{SpiffeWorkloadApi, SpiffeWorkloadApiServer};
use proto::workload::{self as pb};
use tokio::net::UnixListener;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::caller::{self, Caller};
use crate::control_plane::ControlPlaneClient;
use crate::state::NodeState;
use crate::svid_cache::SvidSet;

/// The metadata every Workload API request must carry (EP-03/EP-04).
pub const SECURITY_HEADER: &str = "workload.spiffe.io";

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Binds the Workload API socket. The socket is connectable by every local
/// user (mode 0666, set before it appears at `path`): workloads run as many
/// uids, and authorization happens per call by attesting the caller, not by
/// file permissions. A directory it has to create is 0755; workloads should
/// mount it read-only (a writable mount would let one replace the socket).
pub fn bind(path: &Path) -> Result<UnixListener, keyway_serve::unix::BindError> {
    keyway_serve::unix::bind(path, 0o666, 0o755)
}

/// What the Workload API listener allows by default: a node's pods share it,
/// so one caller (a pod, or a uid outside pods) may hold at most
/// `max_per_peer` connections whatever it does, and connections with no
/// stream open are closed after five minutes.
pub fn limits() -> keyway_serve::Limits {
    keyway_serve::Limits {
        max_connections: 4096,
        max_per_peer: 128,
        max_concurrent_streams: 128,
        ..keyway_serve::Limits::default()
    }
}

/// Who is on a Workload API connection, established once at accept.
#[derive(Debug, Clone)]
pub struct ConnectionCaller(Arc<Identified>);

#[derive(Debug)]
struct Identified {
    /// `None` when the connecting process was gone before it could be
    /// identified.
    caller: Option<Caller>,
    /// The connecting process; `None` when the peer's pid is not visible
    /// (another pid namespace), in which case only its uid is known.
    process: Option<caller::PinnedProcess>,
}

impl ConnectionCaller {
    /// Identifies the peer of `stream` (SO_PEERCRED, SO_PEERPIDFD, then
    /// `/proc`). Never fails: what cannot be established is absent and
    /// matches no selector.
    pub fn identify(
        stream: &tokio::net::UnixStream,
        uid: u32,
        pid: Option<i32>,
        proc_root: PathBuf,
        netns_dir: PathBuf,
    ) -> impl std::future::Future<Output = Self> + Send + 'static + use<> {
        use std::os::fd::AsFd;
        let process = pid.filter(|p| *p > 0).and_then(|pid| {
            match caller::PinnedProcess::of_peer(stream.as_fd(), pid) {
                Ok(p) => Some(p),
                Err(e) => {
                    tracing::debug!(pid, error = %e, "cannot pin the Workload API caller");
                    None
                }
            }
        });
        async move {
            let identified = tokio::task::spawn_blocking(move || {
                let caller = match &process {
                    Some(p) => caller::identify_pinned(p, uid, &proc_root, &netns_dir),
                    None => Some(caller::identify(None, uid, &proc_root, &netns_dir)),
                };
                Identified { caller, process }
            })
            .await
            .unwrap_or(Identified {
                caller: None,
                process: None,
            });
            Self(Arc::new(identified))
        }
    }

    /// The pod this connection is from, for the per-caller connection cap.
    fn pod_uid(&self) -> Option<String> {
        self.0.caller.as_ref().and_then(|c| c.pod_uid.clone())
    }

    /// The caller, while the process that connected still exists.
    fn current(&self) -> Result<Caller, Status> {
        let gone = || {
            Status::permission_denied(
                "no identity issued: the process that opened this connection has exited; a Workload API \
                 connection serves only the process that made it (connect again from this process)",
            )
        };
        let caller = self.0.caller.clone().ok_or_else(gone)?;
        if self.0.process.as_ref().is_some_and(|p| !p.is_alive()) {
            return Err(gone());
        }
        Ok(caller)
    }
}

/// Serves the Workload API until `shutdown` turns true. Every connection is
/// admitted per uid, its caller identified once (then counted per pod when
/// it is one), and served with the listener's clocks.
pub async fn serve(
    service: WorkloadApi,
    listener: UnixListener,
    limits: keyway_serve::Limits,
    shutdown: watch::Receiver<bool>,
) {
    let gate = keyway_serve::Gate::new("workload_api", limits, service.metrics.listeners.clone());
    let proc_root = service.proc_root.clone();
    let netns_dir = service.netns_dir.clone();
    let routes = tonic::service::Routes::new(SpiffeWorkloadApiServer::new(service));
    keyway_serve::unix::serve(
        listener,
        gate,
        routes,
        move |stream, peer| {
            let identify =
                ConnectionCaller::identify(stream, peer.uid, peer.pid, proc_root.clone(), netns_dir.clone());
            async move {
                let caller = identify.await;
                Some((caller.pod_uid().map(keyway_serve::PeerKey::Pod), caller))
            }
        },
        shutdown,
    )
    .await;
}

/// Binds `cfg.socket` and serves the Workload API for a started agent until
/// `shutdown` turns true. The one place the server is wired to the agent's
/// state, used by `node-agent run` and by the test harness.
pub fn start(
    cfg: &crate::agent::AgentConfig,
    handles: &crate::agent::AgentHandles,
    metrics: StreamMetrics,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = bind(&cfg.socket).map_err(std::io::Error::other)?;
    let api = WorkloadApi::new(
        handles.state.clone(),
        handles.svids.clone(),
        handles.client.clone(),
        cfg.proc_root.clone(),
        cfg.netns_dir.clone(),
    )
    .with_metrics(metrics);
    handles
        .telemetry
        .readiness
        .set_ready(crate::agent::READY_WORKLOAD_API);
    Ok(tokio::spawn(serve(
        api,
        listener,
        cfg.workload_api_limits.clone(),
        shutdown,
    )))
}

/// The Workload API's metrics: the streams open, and its listener's.
#[derive(Debug, Clone)]
pub struct StreamMetrics {
    streams: Gauge,
    pub listeners: keyway_serve::ListenerMetrics,
}

impl Default for StreamMetrics {
    /// In a registry of their own (tests, and agents no one scrapes).
    fn default() -> Self {
        let r = Registry::new();
        Self::register(&r, keyway_serve::ListenerMetrics::register(&r))
    }
}

impl StreamMetrics {
    pub fn register(r: &Registry, listeners: keyway_serve::ListenerMetrics) -> Self {
        Self {
            streams: r.register(
                "keyway_workload_api_streams",
                "Open Workload API streams (X.509 SVIDs, bundles, JWT bundles).",
                Gauge::default(),
            ),
            listeners,
        }
    }

    /// Counts an open Workload API stream until the guard drops.
    pub fn stream(&self) -> StreamGuard {
        self.streams.inc();
        StreamGuard(self.streams.clone())
    }
}

/// One open Workload API stream (see [`StreamMetrics::stream`]).
#[derive(Debug)]
pub struct StreamGuard(Gauge);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The Workload API service.
#[derive(Debug, Clone)]
pub struct WorkloadApi {
    state: watch::Receiver<Arc<NodeState>>,
    svids: watch::Receiver<SvidSet>,
    client: watch::Receiver<Option<ControlPlaneClient>>,
    proc_root: PathBuf,
    netns_dir: PathBuf,
    metrics: StreamMetrics,
}

impl WorkloadApi {
    pub fn new(
        state: watch::Receiver<Arc<NodeState>>,
        svids: watch::Receiver<SvidSet>,
        client: watch::Receiver<Option<ControlPlaneClient>>,
        proc_root: PathBuf,
        netns_dir: PathBuf,
    ) -> Self {
        Self {
            state,
            svids,
            client,
            proc_root,
            netns_dir,
            metrics: StreamMetrics::default(),
        }
    }

    /// Counts open streams in `metrics`.
    pub fn with_metrics(mut self, metrics: StreamMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Checks the security header and identifies the caller.
    fn caller<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        let values: Vec<_> = req.metadata().get_all(SECURITY_HEADER).iter().collect();
        if values.len() != 1 || values[0].to_str().ok() != Some("true") {
            return Err(Status::invalid_argument("security header missing from request"));
        }
        if !self.state.borrow().synced {
            return Err(Status::unavailable(
                "the node agent is starting and has not synced with the control plane yet; retry shortly",
            ));
        }
        req.extensions()
            .get::<ConnectionCaller>()
            .ok_or_else(|| Status::internal("the connection carries no attested caller"))?
            .current()
    }

    /// The SPIFFE IDs `caller` is entitled to, or PermissionDenied naming what
    /// was looked at.
    fn entitled(state: &NodeState, caller: &Caller) -> Result<Vec<String>, Status> {
        let mut ids: Vec<String> = state
            .workloads
            .values()
            .filter(|w| caller::matches(&w.selectors, caller))
            .map(|w| w.spiffe_id.clone())
            .collect();
        ids.dedup();
        if ids.is_empty() {
            return Err(Status::permission_denied(format!(
                "no identity issued: no Workload on this node has a selector matching the caller \
                 (uid {}, netns {}, pod {}); add a selector such as \"unix:uid:{}\" to the Workload",
                caller.uid,
                caller.netns.as_deref().unwrap_or("-"),
                caller.pod_uid.as_deref().unwrap_or("-"),
                caller.uid
            )));
        }
        Ok(ids)
    }

    fn bundles(state: &NodeState) -> BTreeMap<String, Vec<u8>> {
        state
            .bundle
            .iter()
            .map(|b| (format!("spiffe://{}", b.trust_domain()), b.concatenated_der()))
            .collect()
    }
}

/// The full X509-SVID state for a caller (WL-04), or `None` while its SVIDs
/// have not been issued yet.
fn x509_response(
    state: &NodeState,
    svids: &SvidSet,
    caller: &Caller,
) -> Result<Option<pb::X509svidResponse>, Status> {
    let ids = WorkloadApi::entitled(state, caller)?;
    let Some(bundle) = state.bundle.as_ref() else {
        return Ok(None);
    };
    let bundle_der = bundle.concatenated_der();
    let now = SystemTime::now();
    let svids: Vec<pb::X509svid> = ids
        .iter()
        .filter_map(|id| svids.get(id))
        .filter(|s| s.not_after() > now)
        .map(|s| pb::X509svid {
            spiffe_id: s.spiffe_id().to_string(),
            x509_svid: s.chain_der(),
            x509_svid_key: s.key_pkcs8().to_vec(),
            bundle: bundle_der.clone(),
            hint: String::new(),
        })
        .collect();
    if svids.is_empty() {
        return Ok(None);
    }
    Ok(Some(pb::X509svidResponse {
        svids,
        crl: Vec::new(),
        federated_bundles: Default::default(),
    }))
}

/// A fingerprint of a message, so a stream remembers what it sent in 8 bytes
/// rather than a copy of every SVID and key it sent.
fn fingerprint<T: prost::Message>(msg: &T) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    msg.encode_to_vec().hash(&mut h);
    h.finish()
}

/// A stream that yields `compute()` whenever the node state or the SVID set
/// change and the result differs from what was sent last (identical updates
/// are not pushed again). The first message goes out as soon as there is one
/// (WL-05). An error ends the stream.
fn watch_stream<T, F>(
    metrics: &StreamMetrics,
    state: watch::Receiver<Arc<NodeState>>,
    svids: watch::Receiver<SvidSet>,
    compute: F,
) -> ResponseStream<T>
where
    T: prost::Message + Send + Sync + 'static,
    F: Fn(&NodeState, &SvidSet) -> Result<Option<T>, Status> + Send + Sync + 'static,
{
    let compute = Arc::new(compute);
    // Counted while the stream exists: the closure owns the guard.
    let open = metrics.stream();
    let stream = futures::stream::unfold(
        (state, svids, None::<u64>, false),
        move |(mut state, mut svids, last, done)| {
            let _open = &open;
            let compute = compute.clone();
            async move {
                if done {
                    return None;
                }
                loop {
                    let next = {
                        let st = state.borrow_and_update().clone();
                        let sv = svids.borrow_and_update().clone();
                        compute(&st, &sv)
                    };
                    match next {
                        Err(status) => return Some((Err(status), (state, svids, last, true))),
                        Ok(Some(msg)) => {
                            let print = fingerprint(&msg);
                            if last != Some(print) {
                                return Some((Ok(msg), (state, svids, Some(print), false)));
                            }
                        }
                        _ => {}
                    }
                    tokio::select! {
                        r = state.changed() => if r.is_err() { return None },
                        r = svids.changed() => if r.is_err() { return None },
                    }
                }
            }
        },
    );
    Box::pin(stream)
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = ResponseStream<pb::X509svidResponse>;

    async fn fetch_x509svid(
        &self,
        req: Request<pb::X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let caller = self.caller(&req)?;
        Self::entitled(&self.state.borrow(), &caller)?;
        let stream = watch_stream(
            &self.metrics,
            self.state.clone(),
            self.svids.clone(),
            move |st, sv| x509_response(st, sv, &caller),
        );
        Ok(Response::new(stream))
    }

    type FetchX509BundlesStream = ResponseStream<pb::X509BundlesResponse>;

    async fn fetch_x509_bundles(
        &self,
        req: Request<pb::X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        let caller = self.caller(&req)?;
        Self::entitled(&self.state.borrow(), &caller)?;
        let stream = watch_stream(
            &self.metrics,
            self.state.clone(),
            self.svids.clone(),
            move |st, _| {
                Self::entitled(st, &caller)?;
                let bundles = Self::bundles(st);
                Ok((!bundles.is_empty()).then(|| pb::X509BundlesResponse {
                    crl: Vec::new(),
                    bundles: bundles.into_iter().collect(),
                }))
            },
        );
        Ok(Response::new(stream))
    }

    async fn fetch_jwtsvid(
        &self,
        req: Request<pb::JwtsvidRequest>,
    ) -> Result<Response<pb::JwtsvidResponse>, Status> {
        let caller = self.caller(&req)?;
        let req = req.into_inner();
        if req.audience.is_empty() || req.audience.iter().any(|a| a.is_empty()) {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        let entitled = Self::entitled(&self.state.borrow(), &caller)?;
        let ids = if req.spiffe_id.is_empty() {
            entitled
        } else if entitled.contains(&req.spiffe_id) {
            vec![req.spiffe_id.clone()]
        } else {
            return Err(Status::permission_denied(format!(
                "the caller is not entitled to {}; it may ask for: {}",
                req.spiffe_id,
                entitled.join(", ")
            )));
        };
        let mut client = self
            .client
            .borrow()
            .clone()
            .ok_or_else(|| Status::unavailable("not connected to the control plane; retry shortly"))?;
        let mut svids = Vec::new();
        for id in ids {
            let r = client
                .raw()
                .mint_workload_jwt(proto::keyway::MintWorkloadJwtRequest {
                    spiffe_id: id.clone(),
                    audience: req.audience.clone(),
                })
                .await
                .map_err(|s| {
                    Status::unavailable(format!(
                        "the control plane could not mint a JWT-SVID: {}",
                        s.message()
                    ))
                })?
                .into_inner();
            svids.push(pb::Jwtsvid {
                spiffe_id: id,
                svid: r.token,
                hint: String::new(),
            });
        }
        Ok(Response::new(pb::JwtsvidResponse { svids }))
    }

    type FetchJWTBundlesStream = ResponseStream<pb::JwtBundlesResponse>;

    async fn fetch_jwt_bundles(
        &self,
        req: Request<pb::JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        let caller = self.caller(&req)?;
        Self::entitled(&self.state.borrow(), &caller)?;
        let stream = watch_stream(
            &self.metrics,
            self.state.clone(),
            self.svids.clone(),
            move |st, _| {
                Self::entitled(st, &caller)?;
                let Some(bundle) = st.bundle.as_ref() else {
                    return Ok(None);
                };
                // WL-15: only jwt-svid keys.
                let jwks = keyway_identity::jwt::jwt_only_bundle(bundle.jwks())
                    .map_err(|e| Status::internal(format!("bundle: {e}")))?;
                Ok(Some(pb::JwtBundlesResponse {
                    bundles: [(format!("spiffe://{}", bundle.trust_domain()), jwks)]
                        .into_iter()
                        .collect(),
                }))
            },
        );
        Ok(Response::new(stream))
    }

    async fn validate_jwtsvid(
        &self,
        req: Request<pb::ValidateJwtsvidRequest>,
    ) -> Result<Response<pb::ValidateJwtsvidResponse>, Status> {
        let _caller = self.caller(&req)?;
        let req = req.into_inner();
        if req.audience.is_empty() {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        if req.svid.is_empty() {
            return Err(Status::invalid_argument("svid must be specified"));
        }
        let bundle = self
            .state
            .borrow()
            .bundle
            .clone()
            .ok_or_else(|| Status::unavailable("no trust bundle yet"))?;
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let v = keyway_identity::jwt::validate(
            &req.svid,
            bundle.trust_domain(),
            bundle.jwks(),
            &req.audience,
            now,
        )
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(pb::ValidateJwtsvidResponse {
            spiffe_id: v.spiffe_id.to_string(),
            claims: Some(to_struct(v.claims)),
        }))
    }

    type FetchWITSVIDStream = ResponseStream<pb::WitsvidResponse>;

    async fn fetch_witsvid(
        &self,
        _req: Request<pb::WitsvidRequest>,
    ) -> Result<Response<Self::FetchWITSVIDStream>, Status> {
        Err(Status::unimplemented(
            "the WIT-SVID profile is not supported (WL-18)",
        ))
    }

    type FetchWITBundlesStream = ResponseStream<pb::WitBundlesResponse>;

    async fn fetch_wit_bundles(
        &self,
        _req: Request<pb::WitBundlesRequest>,
    ) -> Result<Response<Self::FetchWITBundlesStream>, Status> {
        Err(Status::unimplemented(
            "the WIT-SVID profile is not supported (WL-18)",
        ))
    }
}

fn to_value(v: serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        serde_json::Value::String(s) => Kind::StringValue(s),
        serde_json::Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.into_iter().map(to_value).collect(),
        }),
        serde_json::Value::Object(o) => Kind::StructValue(to_struct(o)),
    };
    prost_types::Value { kind: Some(kind) }
}

fn to_struct(map: serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: map.into_iter().map(|(k, v)| (k, to_value(v))).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_streams_are_counted_until_they_end() {
        let r = Registry::new();
        let m = StreamMetrics::register(&r, keyway_serve::ListenerMetrics::register(&r));
        let g = m.stream();
        assert!(r.render().contains("keyway_workload_api_streams 1\n"));
        drop(g);
        assert!(r.render().contains("keyway_workload_api_streams 0\n"));
    }
}
