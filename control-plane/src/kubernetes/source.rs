//! Kubernetes as the source of workloads and policy.
//!
//! Watchers (kube-runtime reflectors) keep a cache of Pods, ServiceAccounts,
//! Namespaces, Nodes, networking.k8s.io NetworkPolicies and
//! KeywayNetworkPolicies. Each change turns what it touched into the same
//! records standalone `control-plane apply` stores ([`WorkloadRecord`],
//! [`PolicyRecord`]; a NetworkPolicy through [`super::network_policy`]), and
//! the control plane applies them as a batch of changes
//! ([`SourcedChanges`]). From there on there is one code path for both
//! modes: identities, placement, policy compilation and the per-node sync
//! deltas.
//!
//! A pod is a workload when it is bound to a node that exists, its service
//! account exists, and it has not finished (phase Succeeded or Failed). So
//! deleting the pod, its service account or its node revokes its identity on
//! the node: the node's sync drops the workload and the agent stops serving
//! its SVID. The agent recognises the pod's processes by the pod UID in their
//! cgroup (selector `k8s:pod-uid:<uid>`).
//!
//! Only the leader reconciles and writes policy status; the other replicas
//! keep their caches warm so a new leader starts from a complete view.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use keyway_identity::{TrustDomain, spiffe_id};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::{self, Store as Cache};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use super::network_policy::{NETWORK_POLICY_PREFIX, network_policy};
use crate::core::{ControlPlane, SourcedChanges};
use crate::crd::{Condition, KeywayNetworkPolicy, KeywayNetworkPolicyStatus};
use crate::error::ApiError;
use crate::model::policy::{NAMESPACE_LABELS_PREFIX, PolicySpec, is_pseudo_label};
use crate::model::{PolicyRecord, WorkloadRecord};
use keyway_identity::lock::Recover;

/// The condition type Keyway sets on every KeywayNetworkPolicy.
pub const CONDITION_VALID: &str = "Valid";

/// The `Valid` condition a KeywayNetworkPolicy should carry.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusUpdate {
    pub namespace: String,
    pub name: String,
    pub generation: Option<i64>,
    /// `Err(reason)` when the spec was refused.
    pub result: Result<(), PolicyRefusal>,
    /// The condition it has now, if any.
    pub current: Option<Condition>,
}

impl StatusUpdate {
    /// Whether the object's condition already says this.
    pub fn is_current(&self) -> bool {
        self.current.as_ref().is_some_and(|c| {
            let (status, reason, message) = condition_fields(&self.result);
            c.status == status
                && c.reason == reason
                && c.message == message
                && c.observed_generation == self.generation
        })
    }
}

/// Why a policy is not enforced as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyRefusal {
    /// The spec does not validate (the message names the field).
    InvalidSpec(String),
    /// It would compile to more datapath entries than its budget allows.
    OverBudget(String),
}

fn condition_fields(result: &Result<(), PolicyRefusal>) -> (&'static str, &'static str, String) {
    match result {
        Ok(()) => (
            "True",
            "Compiled",
            "the policy is compiled and enforced".to_string(),
        ),
        Err(PolicyRefusal::InvalidSpec(reason)) => (
            "False",
            "InvalidSpec",
            format!(
                "{reason}; the policy changes nothing until it is fixed (its last valid version, if any, stays in force)"
            ),
        ),
        Err(PolicyRefusal::OverBudget(reason)) => (
            "False",
            "OverBudget",
            format!(
                "{reason}; until it fits, the endpoints it selects allow nothing in the directions it has rules \
                 (other namespaces are unaffected)"
            ),
        ),
    }
}

/// A KeywayNetworkPolicy as a record, and the condition it should carry.
/// An invalid spec gives no record: the caller keeps the last valid
/// version in force.
fn keyway_policy(knp: &KeywayNetworkPolicy) -> (Option<PolicyRecord>, StatusUpdate) {
    let namespace = knp.namespace().unwrap_or_default();
    let name = knp.name_any();
    let result = PolicySpec::try_from(&knp.spec);
    let current = knp
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == CONDITION_VALID).cloned());
    let update = StatusUpdate {
        namespace: namespace.clone(),
        name: name.clone(),
        generation: knp.meta().generation,
        result: result
            .as_ref()
            .map(|_| ())
            .map_err(|e| PolicyRefusal::InvalidSpec(e.to_string())),
        current,
    };
    let record = result.ok().map(|spec| PolicyRecord {
        namespace,
        name,
        spec,
    });
    (record, update)
}

/// What a pod's workload depends on besides the pod: the watch caches.
struct Lookups<'a> {
    service_accounts: &'a Cache<ServiceAccount>,
    nodes: &'a Cache<Node>,
    namespaces: &'a Cache<Namespace>,
}

/// A pod's identity labels: its own, and its namespace's under
/// [`NAMESPACE_LABELS_PREFIX`] (what a `namespaceSelector` matches). A pod
/// label that spells a namespace label, or a pseudo label (Keyway's or
/// Cilium's), is dropped: a pod
/// in a namespace without label `team` could otherwise label itself
/// `io.kubernetes.pod.namespace.labels.team: payments` and be let in by a
/// policy admitting namespace `team: payments`.
fn identity_labels(
    pod: &std::collections::BTreeMap<String, String>,
    namespace: &std::collections::BTreeMap<String, String>,
) -> std::collections::BTreeMap<String, String> {
    let mut labels: std::collections::BTreeMap<String, String> = pod
        .iter()
        .filter(|(k, _)| !is_pseudo_label(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for (k, v) in namespace {
        labels.insert(format!("{NAMESPACE_LABELS_PREFIX}{k}"), v.clone());
    }
    labels
}

/// The workload a pod stands for, if it should have an identity now.
fn workload(pod: &SlimPod, td: &TrustDomain, lookups: &Lookups<'_>) -> Option<WorkloadRecord> {
    let namespace = pod.namespace()?;
    let name = pod.name_any();
    let spec = pod.spec.as_ref()?;
    let node = spec.node_name.clone()?;
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return None;
    }
    let service_account = spec
        .service_account_name
        .clone()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".into());
    if lookups.nodes.get(&reflector::ObjectRef::new(&node)).is_none() {
        debug!(pod = %format!("{namespace}/{name}"), node, "pod bound to a node that does not exist: no identity");
        return None;
    }
    if lookups
        .service_accounts
        .get(&reflector::ObjectRef::new(&service_account).within(&namespace))
        .is_none()
    {
        debug!(pod = %format!("{namespace}/{name}"), service_account, "pod's service account does not exist: no identity");
        return None;
    }
    let ns = lookups.namespaces.get(&reflector::ObjectRef::new(&namespace))?;
    let ns_labels = ns.labels();
    let uid = pod.uid()?;
    let spiffe_id = spiffe_id::workload_id(td, &namespace, &service_account).ok()?;
    let host_network = spec.host_network.unwrap_or(false);
    let ips = if host_network {
        // Host-network pods share the node's addresses: in the datapath they
        // are the host, not a workload identity.
        Vec::new()
    } else {
        let status = pod.status.as_ref();
        let mut ips: Vec<String> = status
            .and_then(|s| s.pod_ips.as_ref())
            .map(|list| list.iter().map(|p| p.ip.clone()).collect())
            .unwrap_or_default();
        if ips.is_empty()
            && let Some(ip) = status.and_then(|s| s.pod_ip.clone())
        {
            ips.push(ip);
        }
        ips.retain(|ip| ip.parse::<std::net::IpAddr>().is_ok());
        ips
    };
    let labels = identity_labels(pod.labels(), ns_labels);
    Some(WorkloadRecord {
        namespace,
        name,
        service_account,
        node,
        ips,
        labels,
        selectors: vec![format!("k8s:pod-uid:{uid}")],
        svid_ttl_secs: None,
        identity: 0,
        spiffe_id: spiffe_id.to_string(),
    })
}

/// The reflector caches of the watched kinds.
#[derive(Clone)]
struct Caches {
    pods: Cache<SlimPod>,
    service_accounts: Cache<ServiceAccount>,
    namespaces: Cache<Namespace>,
    nodes: Cache<Node>,
    network_policies: Cache<NetworkPolicy>,
    keyway_policies: Cache<KeywayNetworkPolicy>,
    /// The Nodes that exist, as last looked at: only a Node's coming or
    /// going changes its pods' records (its addresses are read on demand),
    /// so the status updates kubelets send every few seconds cost no pod
    /// scan.
    nodes_present: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

impl Caches {
    async fn ready(&self) -> bool {
        self.pods.wait_until_ready().await.is_ok()
            && self.service_accounts.wait_until_ready().await.is_ok()
            && self.namespaces.wait_until_ready().await.is_ok()
            && self.nodes.wait_until_ready().await.is_ok()
            && self.network_policies.wait_until_ready().await.is_ok()
            && self.keyway_policies.wait_until_ready().await.is_ok()
    }

    fn lookups(&self) -> Lookups<'_> {
        Lookups {
            service_accounts: &self.service_accounts,
            nodes: &self.nodes,
            namespaces: &self.namespaces,
        }
    }
}

/// An object a watch event touched: what has to be looked at again.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Touched {
    Pod {
        namespace: String,
        name: String,
    },
    ServiceAccount {
        namespace: String,
        name: String,
    },
    Namespace(String),
    Node(String),
    NetworkPolicy {
        namespace: String,
        name: String,
    },
    KeywayPolicy {
        namespace: String,
        name: String,
    },
    /// A (re)list of a kind finished: every object of it.
    AllOf(Kind),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Pods,
    ServiceAccounts,
    Namespaces,
    Nodes,
    NetworkPolicies,
    KeywayPolicies,
}

/// A Pod as the pod cache holds it: the fields Keyway reads and nothing
/// else (as Cilium's slim types do). The API server's JSON is parsed
/// straight into it, serde skipping the rest, so a cached pod takes about
/// 500 bytes and its labels, where k8s-openapi's `Pod` takes 2.2 KB inline
/// (1.4 KB of it an all-`None` spec) even trimmed: some 170 MB at 100k pods.
#[derive(Clone, Debug, Default, serde::Deserialize)]
pub(crate) struct SlimPod {
    pub metadata: kube::api::ObjectMeta,
    #[serde(default)]
    pub spec: Option<SlimPodSpec>,
    #[serde(default)]
    pub status: Option<SlimPodStatus>,
}

#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SlimPodSpec {
    #[serde(default)]
    pub node_name: Option<String>,
    #[serde(default)]
    pub service_account_name: Option<String>,
    #[serde(default)]
    pub host_network: Option<bool>,
}

#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SlimPodStatus {
    #[serde(default)]
    pub phase: Option<String>,
    #[serde(default, rename = "podIP")]
    pub pod_ip: Option<String>,
    #[serde(default, rename = "podIPs")]
    pub pod_ips: Option<Vec<SlimPodIp>>,
}

#[derive(Clone, Debug, Default, serde::Deserialize)]
pub(crate) struct SlimPodIp {
    #[serde(default)]
    pub ip: String,
}

/// The API's Pod resource, read as [`SlimPod`].
impl kube::Resource for SlimPod {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(_: &()) -> std::borrow::Cow<'_, str> {
        <Pod as k8s_openapi::Resource>::KIND.into()
    }

    fn group(_: &()) -> std::borrow::Cow<'_, str> {
        <Pod as k8s_openapi::Resource>::GROUP.into()
    }

    fn version(_: &()) -> std::borrow::Cow<'_, str> {
        <Pod as k8s_openapi::Resource>::VERSION.into()
    }

    fn plural(_: &()) -> std::borrow::Cow<'_, str> {
        <Pod as k8s_openapi::Resource>::URL_PATH_SEGMENT.into()
    }

    fn meta(&self) -> &kube::api::ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut kube::api::ObjectMeta {
        &mut self.metadata
    }
}

/// Drops what Keyway never reads, so the caches hold what it uses: managed
/// fields, annotations, and for nodes everything but their addresses (pods
/// are read as [`SlimPod`], which holds nothing else to begin with).
mod trim {
    use k8s_openapi::api::core::v1::{Node, NodeStatus};
    use kube::api::ObjectMeta;

    pub fn meta(m: &mut ObjectMeta) {
        m.managed_fields = None;
        m.annotations = None;
        m.owner_references = None;
        m.finalizers = None;
    }

    pub fn pod(p: &mut super::SlimPod) {
        meta(&mut p.metadata);
    }

    pub fn node(n: &mut Node) {
        meta(&mut n.metadata);
        n.spec = None;
        n.status = n.status.take().map(|s| NodeStatus {
            addresses: s.addresses,
            ..Default::default()
        });
    }
}

/// Starts a reflector for `K` (objects trimmed by `trim` before they are
/// cached) that reports what each event touched. A (re)list is reported
/// once, when it is complete, as [`Touched::AllOf`].
fn reflect<K>(
    client: &kube::Client,
    kind: Kind,
    touched: fn(&K) -> Touched,
    trim: fn(&mut K),
    tx: mpsc::UnboundedSender<Touched>,
) -> Cache<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store::<K>();
    let api: Api<K> = Api::all(client.clone());
    let name = K::kind(&()).to_string();
    let stream =
        reflector::reflector(writer, watcher(api, watcher::Config::default()).modify(trim)).default_backoff();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        let mut failing = false;
        while let Some(event) = stream.next().await {
            let report = match event {
                Ok(event) => {
                    // A re-list that is about to be tried is no recovery yet.
                    if failing && !matches!(event, watcher::Event::Init) {
                        info!(kind = name, "watch recovered");
                        failing = false;
                    }
                    match event {
                        watcher::Event::Apply(o) | watcher::Event::Delete(o) => Some(touched(&o)),
                        watcher::Event::InitDone => Some(Touched::AllOf(kind)),
                        watcher::Event::Init | watcher::Event::InitApply(_) => None,
                    }
                }
                Err(e) => {
                    if !failing {
                        warn!(kind = name, error = %e, "watch failed; retrying with backoff");
                        failing = true;
                    }
                    None
                }
            };
            if let Some(t) = report
                && tx.send(t).is_err()
            {
                return;
            }
        }
    });
    reader
}

fn namespaced<K: Resource>(o: &K) -> (String, String) {
    (
        o.meta().namespace.clone().unwrap_or_default(),
        o.meta().name.clone().unwrap_or_default(),
    )
}

/// Everything a batch of events asks to look at again.
#[derive(Debug, Default)]
struct Dirty {
    pods: std::collections::HashSet<(String, String)>,
    network_policies: std::collections::HashSet<(String, String)>,
    keyway_policies: std::collections::HashSet<(String, String)>,
    nodes_changed: bool,
}

impl Dirty {
    fn is_empty(&self) -> bool {
        self.pods.is_empty()
            && self.network_policies.is_empty()
            && self.keyway_policies.is_empty()
            && !self.nodes_changed
    }

    /// Widens `touched` to the objects whose records depend on it. Pods are
    /// looked up through their service account, node and namespace, so a
    /// change to one of those (rare next to pod churn) rescans the pods.
    fn add(&mut self, touched: Touched, caches: &Caches) {
        let pods_where = |dirty: &mut Self, keep: &dyn Fn(&SlimPod) -> bool| {
            for pod in caches.pods.state() {
                if keep(&pod) {
                    dirty.pods.insert(namespaced(pod.as_ref()));
                }
            }
        };
        match touched {
            Touched::Pod { namespace, name } => {
                self.pods.insert((namespace, name));
            }
            Touched::ServiceAccount { namespace, name } => pods_where(self, &|p| {
                p.namespace().as_deref() == Some(namespace.as_str())
                    && p.spec
                        .as_ref()
                        .and_then(|s| s.service_account_name.as_deref())
                        .filter(|s| !s.is_empty())
                        .unwrap_or("default")
                        == name
            }),
            Touched::Namespace(ns) => {
                pods_where(self, &|p| p.namespace().as_deref() == Some(ns.as_str()));
                for np in caches.network_policies.state() {
                    if np.namespace().as_deref() == Some(ns.as_str()) {
                        self.network_policies.insert(namespaced(np.as_ref()));
                    }
                }
            }
            Touched::Node(node) => {
                let present = caches.nodes.get(&reflector::ObjectRef::new(&node)).is_some();
                let came_or_went = {
                    let mut known = caches.nodes_present.locked();
                    if present {
                        known.insert(node.clone())
                    } else {
                        known.remove(&node)
                    }
                };
                if came_or_went {
                    self.nodes_changed = true;
                    pods_where(self, &|p| {
                        p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node.as_str())
                    })
                }
            }
            Touched::NetworkPolicy { namespace, name } => {
                self.network_policies.insert((namespace, name));
            }
            Touched::KeywayPolicy { namespace, name } => {
                self.keyway_policies.insert((namespace, name));
            }
            Touched::AllOf(kind) => match kind {
                Kind::Pods | Kind::ServiceAccounts | Kind::Namespaces => {
                    pods_where(self, &|_| true);
                    if kind == Kind::Namespaces {
                        for np in caches.network_policies.state() {
                            self.network_policies.insert(namespaced(np.as_ref()));
                        }
                    }
                }
                Kind::Nodes => {
                    *caches.nodes_present.locked() =
                        caches.nodes.state().iter().map(|n| n.name_any()).collect();
                    self.nodes_changed = true;
                    pods_where(self, &|_| true);
                }
                Kind::NetworkPolicies => {
                    for np in caches.network_policies.state() {
                        self.network_policies.insert(namespaced(np.as_ref()));
                    }
                }
                Kind::KeywayPolicies => {
                    for knp in caches.keyway_policies.state() {
                        self.keyway_policies.insert(namespaced(knp.as_ref()));
                    }
                }
            },
        }
    }

    /// Pods and policies that vanished from a cache while a relist was
    /// running are not in it any more: [`Touched::AllOf`] must also drop
    /// what the view holds that the cache lacks.
    fn add_held(&mut self, cp: &ControlPlane) {
        let (workloads, policies) = cp.sourced_keys();
        for key in workloads {
            if let Some((ns, name)) = key.split_once('/') {
                self.pods.insert((ns.to_owned(), name.to_owned()));
            }
        }
        for key in policies {
            let Some((ns, name)) = key.split_once('/') else {
                continue;
            };
            match name.strip_prefix(NETWORK_POLICY_PREFIX) {
                Some(np) => self.network_policies.insert((ns.to_owned(), np.to_owned())),
                None => self.keyway_policies.insert((ns.to_owned(), name.to_owned())),
            };
        }
    }
}

/// Runs the watchers until `shutdown`, keeping the control plane's view of
/// pods and policies current on every replica (each serves Sync streams
/// from it), and, while this replica leads (`leader` true), allocating
/// identities, writing policy status and revoking nodes whose Node is gone.
pub async fn run(
    cp: ControlPlane,
    client: kube::Client,
    mut leader: watch::Receiver<bool>,
    mut shutdown: watch::Receiver<bool>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let caches = Caches {
        pods: reflect(
            &client,
            Kind::Pods,
            |p: &SlimPod| {
                let (namespace, name) = namespaced(p);
                Touched::Pod { namespace, name }
            },
            trim::pod,
            tx.clone(),
        ),
        service_accounts: reflect(
            &client,
            Kind::ServiceAccounts,
            |o: &ServiceAccount| {
                let (namespace, name) = namespaced(o);
                Touched::ServiceAccount { namespace, name }
            },
            |o: &mut ServiceAccount| {
                trim::meta(&mut o.metadata);
                o.secrets = None;
                o.image_pull_secrets = None;
            },
            tx.clone(),
        ),
        namespaces: reflect(
            &client,
            Kind::Namespaces,
            |o: &Namespace| Touched::Namespace(o.name_any()),
            |o: &mut Namespace| {
                trim::meta(&mut o.metadata);
                o.spec = None;
                o.status = None;
            },
            tx.clone(),
        ),
        nodes: reflect(
            &client,
            Kind::Nodes,
            |o: &Node| Touched::Node(o.name_any()),
            trim::node,
            tx.clone(),
        ),
        network_policies: reflect(
            &client,
            Kind::NetworkPolicies,
            |o: &NetworkPolicy| {
                let (namespace, name) = namespaced(o);
                Touched::NetworkPolicy { namespace, name }
            },
            |o: &mut NetworkPolicy| trim::meta(&mut o.metadata),
            tx.clone(),
        ),
        keyway_policies: reflect(
            &client,
            Kind::KeywayPolicies,
            |o: &KeywayNetworkPolicy| {
                let (namespace, name) = namespaced(o);
                Touched::KeywayPolicy { namespace, name }
            },
            |o: &mut KeywayNetworkPolicy| trim::meta(&mut o.metadata),
            tx.clone(),
        ),
        nodes_present: Default::default(),
    };
    drop(tx);
    tokio::select! {
        _ = caches.ready() => {
            info!("Kubernetes caches synced");
        }
        _ = shutdown.changed() => return,
    }
    cp.check_node_addresses_with({
        let nodes = caches.nodes.clone();
        Arc::new(move |name: &str| {
            nodes
                .get(&reflector::ObjectRef::new(name))
                .map(|n| node_addresses(&n))
        })
    });
    let policies: Api<KeywayNetworkPolicy> = Api::all(client.clone());
    let mut dirty = Dirty::default();
    // The first pass looks at everything; so does every gain of leadership
    // (what the last leader left unallocated or unreported is done then).
    let everything = [
        Kind::Pods,
        Kind::Nodes,
        Kind::NetworkPolicies,
        Kind::KeywayPolicies,
    ];
    for kind in everything {
        dirty.add(Touched::AllOf(kind), &caches);
    }
    let mut leading = false;
    let mut statuses_due = true;
    let mut retry: Option<Duration> = None;
    let mut recheck: Option<Duration> = None;
    let mut first = true;
    loop {
        let now_leading = *leader.borrow_and_update();
        if now_leading && !leading {
            for kind in everything {
                dirty.add(Touched::AllOf(kind), &caches);
            }
            statuses_due = true;
        }
        leading = now_leading;
        if !dirty.is_empty() || statuses_due {
            // Let a burst of events (a rollout, a namespace of pods) land
            // before looking.
            tokio::time::sleep(Duration::from_millis(20)).await;
            while let Ok(t) = rx.try_recv() {
                if matches!(t, Touched::AllOf(_)) {
                    dirty.add_held(&cp);
                }
                dirty.add(t, &caches);
            }
            let batch = std::mem::take(&mut dirty);
            match process(&cp, &caches, &policies, batch, leading, &mut statuses_due).await {
                Ok(next) => {
                    retry = None;
                    recheck = next;
                    if first {
                        first = false;
                        cp.sourced_synced();
                        cp.metrics()
                            .readiness
                            .set_ready(crate::metrics::READY_KUBERNETES_CACHES);
                    }
                }
                Err((e, batch)) => {
                    dirty = batch;
                    let next = retry.map_or(Duration::from_millis(200), |d| {
                        (d * 2).min(Duration::from_secs(10))
                    });
                    warn!(error = %e, retry_in = ?next, "taking Kubernetes changes in failed");
                    retry = Some(next);
                }
            }
        }
        let wait = async {
            match retry.or(recheck) {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            t = rx.recv() => match t {
                Some(t) => {
                    if matches!(t, Touched::AllOf(_)) {
                        dirty.add_held(&cp);
                    }
                    dirty.add(t, &caches);
                }
                None => return,
            },
            _ = leader.changed() => {}
            _ = wait => {
                // A retry repeats the failed batch; a recheck looks at nodes.
                dirty.nodes_changed = true;
            }
            _ = shutdown.changed() => return,
        }
    }
}

/// Turns one batch into the view's changes and hands them to the control
/// plane; then, when leading, writes the policy conditions that changed and
/// revokes nodes whose Node is gone. On failure the batch comes back, to be
/// tried again.
async fn process(
    cp: &ControlPlane,
    caches: &Caches,
    policies: &Api<KeywayNetworkPolicy>,
    batch: Dirty,
    leading: bool,
    statuses_due: &mut bool,
) -> Result<Option<Duration>, (ProcessError, Dirty)> {
    let td = cp.config().trust_domain.clone();
    let lookups = caches.lookups();
    let mut changes = SourcedChanges::default();
    for (ns, name) in &batch.pods {
        let pod = caches.pods.get(&reflector::ObjectRef::new(name).within(ns));
        let record = pod.and_then(|p| workload(&p, &td, &lookups));
        changes.workloads.push((format!("{ns}/{name}"), record));
    }
    for (ns, name) in &batch.network_policies {
        let np = caches
            .network_policies
            .get(&reflector::ObjectRef::new(name).within(ns));
        let namespace_exists = caches.namespaces.get(&reflector::ObjectRef::new(ns)).is_some();
        let record = match np {
            Some(np) if namespace_exists => {
                let (record, refused) = network_policy(&np);
                if let Some(e) = refused {
                    warn!(
                        policy = %format!("{ns}/{name}"),
                        reason = %e,
                        "NetworkPolicy refused: until it is fixed, the pods it selects allow nothing in the \
                         directions it names"
                    );
                }
                Some(record)
            }
            _ => None,
        };
        changes
            .policies
            .push((format!("{ns}/{NETWORK_POLICY_PREFIX}{name}"), record));
    }
    for (ns, name) in &batch.keyway_policies {
        let key = format!("{ns}/{name}");
        match caches
            .keyway_policies
            .get(&reflector::ObjectRef::new(name).within(ns))
        {
            None => changes.policies.push((key, None)),
            Some(knp) => {
                // An invalid spec changes nothing: the last valid version
                // (if any) stays in the view, and in force.
                if let (Some(record), _) = keyway_policy(&knp) {
                    changes.policies.push((key, Some(record)));
                }
            }
        }
    }
    let policies_touched = !batch.network_policies.is_empty() || !batch.keyway_policies.is_empty();
    let outcome = if changes.is_empty() {
        Default::default()
    } else {
        match cp.apply_sourced(changes).await {
            Ok(o) => o,
            Err(e) => return Err((ProcessError::Apply(e), batch)),
        }
    };
    if outcome.changed > 0 {
        debug!(
            changed = outcome.changed,
            allocated = outcome.allocated,
            waiting = outcome.waiting,
            "took Kubernetes changes in"
        );
    }
    if !leading {
        return Ok(None);
    }
    // Conditions: a policy's own validity, and whether it fits its budget,
    // which any change of policies or identities can alter.
    if *statuses_due || policies_touched || outcome.allocated > 0 {
        let refused = cp.cluster().policy.refused.clone();
        for knp in caches.keyway_policies.state() {
            let (_, mut update) = keyway_policy(&knp);
            if update.result.is_ok()
                && let Some(why) = refused.get(&format!("{}/{}", update.namespace, update.name))
            {
                update.result = Err(PolicyRefusal::OverBudget(why.clone()));
            }
            if !update.is_current()
                && let Err(e) = write_status(policies, &update).await
            {
                *statuses_due = true;
                return Err((e, batch));
            }
        }
        *statuses_due = false;
    }
    if batch.nodes_changed || *statuses_due {
        return revoke_deleted_nodes(cp, &caches.nodes)
            .await
            .map_err(|e| (ProcessError::Revoke(e), Dirty::default()));
    }
    Ok(None)
}

/// Why a batch of changes was not taken in (it is retried).
#[derive(Debug, thiserror::Error)]
enum ProcessError {
    #[error("{0}")]
    Apply(#[source] ApiError),
    #[error("{0}")]
    Revoke(#[source] ApiError),
    #[error("cannot write the status of KeywayNetworkPolicy {namespace}/{name}: {source}")]
    Status {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// How long a node record may exist without its Node before it is revoked:
/// an agent can attest a moment before this replica's cache sees the Node.
const NODE_GRACE_SECS: i64 = 30;

/// A Node's addresses (InternalIP, ExternalIP, ...), the ones its agent may
/// advertise for mutual auth.
fn node_addresses(node: &Node) -> Vec<std::net::IpAddr> {
    node.status
        .iter()
        .flat_map(|s| s.addresses.iter().flatten())
        .filter_map(|a| a.address.parse().ok())
        .collect()
}

/// Revokes the attested nodes whose Node is gone (after the grace period);
/// returns when to look again for those still within it.
async fn revoke_deleted_nodes(cp: &ControlPlane, nodes: &Cache<Node>) -> Result<Option<Duration>, ApiError> {
    let now = crate::clock::now_unix();
    let mut recheck: Option<i64> = None;
    for record in cp
        .cluster()
        .records
        .nodes
        .iter()
        .filter(|n| nodes.get(&reflector::ObjectRef::new(&n.name)).is_none())
    {
        let age = now - record.attested_at;
        if age >= NODE_GRACE_SECS {
            if cp.revoke_node(&record.name).await? {
                info!(node = %record.name, "the Node was deleted: node revoked");
            }
        } else {
            let left = NODE_GRACE_SECS - age;
            recheck = Some(recheck.map_or(left, |r| r.min(left)));
        }
    }
    Ok(recheck.map(|s| Duration::from_secs(s.max(1) as u64)))
}

fn rfc3339_now() -> String {
    let t = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

async fn write_status(
    policies: &Api<KeywayNetworkPolicy>,
    update: &StatusUpdate,
) -> Result<(), ProcessError> {
    let (status, reason, message) = condition_fields(&update.result);
    let transition = match &update.current {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => rfc3339_now(),
    };
    let body = serde_json::json!({
        "status": KeywayNetworkPolicyStatus {
            conditions: vec![Condition {
                type_: CONDITION_VALID.into(),
                status: status.into(),
                reason: reason.into(),
                message: message.clone(),
                observed_generation: update.generation,
                last_transition_time: transition,
            }],
        }
    });
    let api: Api<KeywayNetworkPolicy> = Api::namespaced(policies.clone().into_client(), &update.namespace);
    match api
        .patch_status(&update.name, &PatchParams::default(), &Patch::Merge(&body))
        .await
    {
        Ok(_) => {
            match &update.result {
                Ok(()) => {
                    info!(policy = %format!("{}/{}", update.namespace, update.name), "KeywayNetworkPolicy compiled")
                }
                Err(_) => {
                    warn!(policy = %format!("{}/{}", update.namespace, update.name), reason, message = %message, "KeywayNetworkPolicy refused")
                }
            }
            Ok(())
        }
        // Deleted since the cache saw it: nothing to say.
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(source) => Err(ProcessError::Status {
            namespace: update.namespace.clone(),
            name: update.name.clone(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pod as the API server sends it (containers, volumes, conditions
    /// and all) keeps in the cache exactly what a workload is made of.
    #[test]
    fn a_pod_is_cached_with_the_fields_keyway_reads_and_no_others() {
        let pod: SlimPod = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "web-1", "namespace": "shop", "uid": "u-1",
                "labels": { "app": "web" },
                "annotations": { "big": "x" },
                "managedFields": [{ "manager": "kubectl" }]
            },
            "spec": {
                "nodeName": "n1",
                "serviceAccountName": "web",
                "hostNetwork": false,
                "containers": [{ "name": "c", "image": "busybox", "command": ["sleep", "1"] }],
                "volumes": [{ "name": "v", "emptyDir": {} }]
            },
            "status": {
                "phase": "Running",
                "podIP": "10.0.0.5",
                "podIPs": [{ "ip": "10.0.0.5" }, { "ip": "fd00::5" }],
                "conditions": [{ "type": "Ready", "status": "True" }]
            }
        }))
        .unwrap();
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.node_name.as_deref(), Some("n1"));
        assert_eq!(spec.service_account_name.as_deref(), Some("web"));
        assert_eq!(spec.host_network, Some(false));
        let status = pod.status.as_ref().unwrap();
        assert_eq!(status.phase.as_deref(), Some("Running"));
        assert_eq!(status.pod_ip.as_deref(), Some("10.0.0.5"));
        let ips: Vec<&str> = status.pod_ips.iter().flatten().map(|p| p.ip.as_str()).collect();
        assert_eq!(ips, ["10.0.0.5", "fd00::5"]);
        assert_eq!(pod.uid().as_deref(), Some("u-1"));
        assert_eq!(pod.labels().get("app").map(String::as_str), Some("web"));
        let mut trimmed = pod.clone();
        trim::pod(&mut trimmed);
        assert!(trimmed.metadata.annotations.is_none() && trimmed.metadata.managed_fields.is_none());
        // The cache's resource is the API's Pods.
        assert_eq!(
            SlimPod::url_path(&(), Some("shop")),
            "/api/v1/namespaces/shop/pods"
        );
    }

    /// The attack: a pod in a namespace without label `team` labels itself
    /// as if its namespace had `team: payments`, to be admitted by a
    /// `namespaceSelector` for that team.
    #[test]
    fn a_pod_cannot_label_itself_into_another_namespaces_labels() {
        let labels = |pairs: &[(&str, &str)]| -> std::collections::BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let forged = labels(&[
            ("app", "web"),
            ("io.kubernetes.pod.namespace.labels.team", "payments"),
            ("io.kubernetes.pod.namespace", "payments"),
            ("io.kubernetes.pod.serviceaccount", "payer"),
            ("io.cilium.k8s.policy.serviceaccount", "payer"),
            ("io.cilium.k8s.namespace.labels.team", "payments"),
        ]);
        let got = identity_labels(&forged, &labels(&[("env", "dev")]));
        assert_eq!(
            got,
            labels(&[("app", "web"), ("io.kubernetes.pod.namespace.labels.env", "dev")])
        );
        // The namespace's own label stands, whatever the pod says.
        let got = identity_labels(&forged, &labels(&[("team", "shop")]));
        assert_eq!(got["io.kubernetes.pod.namespace.labels.team"], "shop");
        // And a selector for the payments team does not select it.
        let id = crate::model::IdentityRecord {
            id: 300,
            spiffe_id: "spiffe://cluster.local/ns/evil/sa/default".into(),
            namespace: "evil".into(),
            service_account: "default".into(),
            labels: got,
        };
        let payments = crate::model::policy::Selector {
            match_labels: labels(&[("io.kubernetes.pod.namespace.labels.team", "payments")]),
            ..Default::default()
        };
        assert!(!payments.matches(&id));
    }

    #[test]
    fn refused_policies_say_why_and_what_is_enforced_meanwhile() {
        let (status, reason, message) = condition_fields(&Ok(()));
        assert_eq!((status, reason), ("True", "Compiled"));
        assert!(message.contains("enforced"));
        let (status, reason, message) =
            condition_fields(&Err(PolicyRefusal::InvalidSpec("spec.ingress[0]: bad".into())));
        assert_eq!((status, reason), ("False", "InvalidSpec"));
        assert!(message.starts_with("spec.ingress[0]: bad") && message.contains("last valid version"));
        let (status, reason, message) = condition_fields(&Err(PolicyRefusal::OverBudget(
            "compiles to about 253 datapath entries, over the per-policy budget of 200".into(),
        )));
        assert_eq!((status, reason), ("False", "OverBudget"));
        assert!(
            message.contains("budget of 200") && message.contains("allow nothing"),
            "{message}"
        );
    }
}
