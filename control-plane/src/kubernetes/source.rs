//! Kubernetes as the source of workloads and policy.
//!
//! Watchers (kube-runtime reflectors) keep a cache of Pods, ServiceAccounts,
//! Namespaces, Nodes, networking.k8s.io NetworkPolicies and
//! KeywayNetworkPolicies. Whenever any of them changes, [`desired`] turns the
//! caches into the same records standalone `control-plane apply` stores
//! ([`WorkloadRecord`], [`PolicyRecord`]), and the control plane reconciles
//! the store to them ([`ControlPlane::reconcile`]). From the store on there is
//! one code path for both modes: identities, placement, policy compilation
//! and the per-node sync deltas.
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

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, ServiceAccount};
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector as K8sSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use keyway_identity::{TrustDomain, spiffe_id};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::{self, Store as Cache};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use serde_yaml::{Mapping, Value};
use tokio::sync::{Notify, watch};
use tracing::{debug, info, warn};

use super::crd::{Condition, KeywayNetworkPolicy, KeywayNetworkPolicyStatus};
use crate::policy::NAMESPACE_LABELS_PREFIX;
use crate::registry::policy_spec;
use crate::server::ControlPlane;
use crate::store::{PolicyRecord, RegistrySnapshot, WorkloadRecord};

/// Prefix of the store names of policies that come from a networking.k8s.io
/// NetworkPolicy. `:` cannot appear in a Kubernetes object name, so these
/// never collide with a KeywayNetworkPolicy of the same name.
pub const NETWORK_POLICY_PREFIX: &str = "networkpolicy:";

/// The condition type Keyway sets on every KeywayNetworkPolicy.
pub const CONDITION_VALID: &str = "Valid";

/// The cached objects [`desired`] reads.
#[derive(Debug, Default)]
pub struct Inputs {
    pub pods: Vec<Arc<Pod>>,
    pub service_accounts: Vec<Arc<ServiceAccount>>,
    pub namespaces: Vec<Arc<Namespace>>,
    pub nodes: Vec<Arc<Node>>,
    pub network_policies: Vec<Arc<NetworkPolicy>>,
    pub keyway_policies: Vec<Arc<KeywayNetworkPolicy>>,
}

/// What the store should hold, and what to say on each KeywayNetworkPolicy.
#[derive(Debug, Default)]
pub struct Desired {
    pub workloads: Vec<WorkloadRecord>,
    pub policies: Vec<PolicyRecord>,
    pub statuses: Vec<StatusUpdate>,
}

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

/// Turns the caches into store records. `stored` is what the store holds now:
/// a KeywayNetworkPolicy whose new spec is invalid keeps its stored version.
pub fn desired(inputs: &Inputs, td: &TrustDomain, stored: &RegistrySnapshot) -> Desired {
    let mut out = Desired::default();
    let service_accounts: std::collections::HashSet<(String, String)> = inputs
        .service_accounts
        .iter()
        .map(|sa| (sa.namespace().unwrap_or_default(), sa.name_any()))
        .collect();
    let nodes: std::collections::HashSet<String> = inputs.nodes.iter().map(|n| n.name_any()).collect();
    let namespace_labels: HashMap<String, BTreeMap<String, String>> = inputs
        .namespaces
        .iter()
        .map(|ns| (ns.name_any(), ns.labels().clone()))
        .collect();

    for pod in &inputs.pods {
        if let Some(w) = workload(pod, td, &service_accounts, &nodes, &namespace_labels) {
            out.workloads.push(w);
        }
    }
    out.workloads.sort_by_key(WorkloadRecord::key);

    for np in &inputs.network_policies {
        if !namespace_labels.contains_key(&np.namespace().unwrap_or_default()) {
            continue;
        }
        match network_policy(np) {
            Ok(p) => out.policies.push(p),
            Err(e) => warn!(
                policy = %format!("{}/{}", np.namespace().unwrap_or_default(), np.name_any()),
                reason = %e,
                "NetworkPolicy not enforced"
            ),
        }
    }

    for knp in &inputs.keyway_policies {
        let namespace = knp.namespace().unwrap_or_default();
        let name = knp.name_any();
        let result = serde_yaml::to_value(&knp.spec)
            .map_err(|e| e.to_string())
            .and_then(policy_spec);
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
                .map_err(|e| PolicyRefusal::InvalidSpec(e.clone())),
            current,
        };
        match result {
            Ok(spec) => out.policies.push(PolicyRecord {
                namespace,
                name,
                spec,
            }),
            Err(_) => {
                if let Some(previous) = stored
                    .policies
                    .iter()
                    .find(|p| p.namespace == namespace && p.name == name)
                {
                    out.policies.push(previous.clone());
                }
            }
        }
        out.statuses.push(update);
    }
    out.policies.sort_by_key(PolicyRecord::key);
    out
}

/// The workload a pod stands for, if it should have an identity now.
fn workload(
    pod: &Pod,
    td: &TrustDomain,
    service_accounts: &std::collections::HashSet<(String, String)>,
    nodes: &std::collections::HashSet<String>,
    namespace_labels: &HashMap<String, BTreeMap<String, String>>,
) -> Option<WorkloadRecord> {
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
    if !nodes.contains(&node) {
        debug!(pod = %format!("{namespace}/{name}"), node, "pod bound to a node that does not exist: no identity");
        return None;
    }
    if !service_accounts.contains(&(namespace.clone(), service_account.clone())) {
        debug!(pod = %format!("{namespace}/{name}"), service_account, "pod's service account does not exist: no identity");
        return None;
    }
    let ns_labels = namespace_labels.get(&namespace)?;
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
    let mut labels = pod.labels().clone();
    for (k, v) in ns_labels {
        labels.insert(format!("{NAMESPACE_LABELS_PREFIX}{k}"), v.clone());
    }
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

/// A networking.k8s.io NetworkPolicy as a KeywayNetworkPolicy spec (without
/// authentication), validated by the same [`policy_spec`].
///
/// - `podSelector` selects endpoints in the policy's namespace.
/// - A peer's `namespaceSelector` matches namespace labels (carried on every
///   workload as `io.kubernetes.pod.namespace.labels.<key>`); `{}` means every
///   namespace. Without it a peer's `podSelector` picks from the policy's
///   namespace.
/// - An absent or empty `from`/`to` allows every peer; absent `ports` every port.
/// - `ipBlock` peers and named ports are not enforced (Keyway matches
///   identities, not CIDRs, and a pod's named ports are not in its identity):
///   such a peer or port is left out, which fails closed.
pub fn network_policy(np: &NetworkPolicy) -> Result<PolicyRecord, String> {
    let namespace = np.namespace().unwrap_or_default();
    let name = np.name_any();
    let spec = np.spec.as_ref().ok_or("spec is missing")?;
    let mut out = Mapping::new();
    out.insert(
        "endpointSelector".into(),
        selector_value(spec.pod_selector.as_ref(), None),
    );
    let types: Vec<String> = spec.policy_types.clone().unwrap_or_else(|| {
        let mut t = vec!["Ingress".to_string()];
        if spec.egress.is_some() {
            t.push("Egress".into());
        }
        t
    });
    if types.iter().any(|t| t == "Ingress") {
        let rules = spec.ingress.clone().unwrap_or_default();
        let list: Vec<Value> = rules
            .iter()
            .filter_map(|r| {
                rule_value(
                    r.from.as_deref(),
                    r.ports.as_deref(),
                    "fromEndpoints",
                    "fromEntities",
                )
            })
            .collect();
        out.insert("ingress".into(), Value::Sequence(list));
    }
    if types.iter().any(|t| t == "Egress") {
        let rules = spec.egress.clone().unwrap_or_default();
        let list: Vec<Value> = rules
            .iter()
            .filter_map(|r| rule_value(r.to.as_deref(), r.ports.as_deref(), "toEndpoints", "toEntities"))
            .collect();
        out.insert("egress".into(), Value::Sequence(list));
    }
    let spec = policy_spec(Value::Mapping(out))?;
    Ok(PolicyRecord {
        namespace,
        name: format!("{NETWORK_POLICY_PREFIX}{name}"),
        spec,
    })
}

/// One NetworkPolicy rule, or `None` when nothing of it can be enforced
/// (then it allows nothing, like a rule whose peers all fail to match).
fn rule_value(
    peers: Option<&[NetworkPolicyPeer]>,
    ports: Option<&[NetworkPolicyPort]>,
    endpoints_key: &str,
    entities_key: &str,
) -> Option<Value> {
    let mut rule = Mapping::new();
    match peers {
        None | Some([]) => {
            rule.insert(entities_key.into(), Value::Sequence(vec!["all".into()]));
        }
        Some(peers) => {
            let selectors: Vec<Value> = peers
                .iter()
                .filter_map(|p| {
                    if p.ip_block.is_some() {
                        warn!("NetworkPolicy ipBlock peers are not enforced by Keyway; the peer is left out (fails closed)");
                        return None;
                    }
                    Some(selector_value(p.pod_selector.as_ref(), p.namespace_selector.as_ref()))
                })
                .collect();
            if selectors.is_empty() {
                return None;
            }
            rule.insert(endpoints_key.into(), Value::Sequence(selectors));
        }
    }
    if let Some(ports) = ports.filter(|p| !p.is_empty()) {
        let mut list = Vec::new();
        for p in ports {
            let protocol = p.protocol.clone().unwrap_or_else(|| "TCP".into());
            match &p.port {
                // No port: every port of the protocol.
                None => list.push(port_value("0", None, &protocol)),
                // A range stays a range: it compiles to one entry per 256
                // ports, and the policy budget bounds the rest.
                Some(IntOrString::Int(n)) => list.push(port_value(
                    &n.to_string(),
                    p.end_port.filter(|end| end > n),
                    &protocol,
                )),
                Some(IntOrString::String(s)) => match s.parse::<u16>() {
                    Ok(n) => list.push(port_value(&n.to_string(), None, &protocol)),
                    Err(_) => {
                        warn!(port = %s, "NetworkPolicy named ports are not enforced by Keyway; left out (fails closed)")
                    }
                },
            }
        }
        if list.is_empty() {
            return None;
        }
        let mut port_rule = Mapping::new();
        port_rule.insert("ports".into(), Value::Sequence(list));
        rule.insert("toPorts".into(), Value::Sequence(vec![Value::Mapping(port_rule)]));
    }
    Some(Value::Mapping(rule))
}

fn port_value(port: &str, end_port: Option<i32>, protocol: &str) -> Value {
    let mut m = Mapping::new();
    m.insert("port".into(), port.into());
    if let Some(end) = end_port {
        m.insert("endPort".into(), Value::Number(end.into()));
    }
    m.insert("protocol".into(), protocol.into());
    Value::Mapping(m)
}

/// A pod selector, optionally combined with a namespace selector, in the
/// KeywayNetworkPolicy selector shape.
fn selector_value(pods: Option<&K8sSelector>, namespaces: Option<&K8sSelector>) -> Value {
    let mut labels = Mapping::new();
    let mut exprs = Vec::new();
    let mut add = |sel: &K8sSelector, prefix: &str| {
        for (k, v) in sel.match_labels.iter().flatten() {
            labels.insert(format!("{prefix}{k}").into(), v.clone().into());
        }
        for r in sel.match_expressions.iter().flatten() {
            let mut m = Mapping::new();
            m.insert("key".into(), format!("{prefix}{}", r.key).into());
            m.insert("operator".into(), r.operator.clone().into());
            if let Some(values) = &r.values {
                m.insert(
                    "values".into(),
                    Value::Sequence(values.iter().map(|v| v.clone().into()).collect()),
                );
            }
            exprs.push(Value::Mapping(m));
        }
    };
    if let Some(sel) = pods {
        add(sel, "");
    }
    if let Some(sel) = namespaces {
        add(sel, NAMESPACE_LABELS_PREFIX);
        // `namespaceSelector: {}` selects every namespace.
        let mut m = Mapping::new();
        m.insert("key".into(), crate::policy::NAMESPACE_LABEL.into());
        m.insert("operator".into(), "Exists".into());
        exprs.push(Value::Mapping(m));
    }
    let mut out = Mapping::new();
    if !labels.is_empty() {
        out.insert("matchLabels".into(), Value::Mapping(labels));
    }
    if !exprs.is_empty() {
        out.insert("matchExpressions".into(), Value::Sequence(exprs));
    }
    Value::Mapping(out)
}

/// The reflector caches of the watched kinds.
#[derive(Clone)]
struct Caches {
    pods: Cache<Pod>,
    service_accounts: Cache<ServiceAccount>,
    namespaces: Cache<Namespace>,
    nodes: Cache<Node>,
    network_policies: Cache<NetworkPolicy>,
    keyway_policies: Cache<KeywayNetworkPolicy>,
}

impl Caches {
    fn inputs(&self) -> Inputs {
        Inputs {
            pods: self.pods.state(),
            service_accounts: self.service_accounts.state(),
            namespaces: self.namespaces.state(),
            nodes: self.nodes.state(),
            network_policies: self.network_policies.state(),
            keyway_policies: self.keyway_policies.state(),
        }
    }

    async fn ready(&self) -> bool {
        self.pods.wait_until_ready().await.is_ok()
            && self.service_accounts.wait_until_ready().await.is_ok()
            && self.namespaces.wait_until_ready().await.is_ok()
            && self.nodes.wait_until_ready().await.is_ok()
            && self.network_policies.wait_until_ready().await.is_ok()
            && self.keyway_policies.wait_until_ready().await.is_ok()
    }
}

/// Starts a reflector for `K` that pokes `changed` on every event.
fn reflect<K>(client: &kube::Client, changed: Arc<Notify>) -> Cache<K>
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
    let kind = K::kind(&()).to_string();
    let stream = reflector::reflector(writer, watcher(api, watcher::Config::default())).default_backoff();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        let mut failing = false;
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => {
                    if failing {
                        info!(kind, "watch recovered");
                        failing = false;
                    }
                    changed.notify_one();
                }
                Err(e) => {
                    if !failing {
                        warn!(kind, error = %e, "watch failed; retrying with backoff");
                        failing = true;
                    }
                }
            }
        }
    });
    reader
}

/// Runs the watchers until `shutdown`, reconciling the store whenever this
/// replica leads (`leader` true).
pub async fn run(
    cp: ControlPlane,
    client: kube::Client,
    mut leader: watch::Receiver<bool>,
    mut shutdown: watch::Receiver<bool>,
) {
    let changed = Arc::new(Notify::new());
    let caches = Caches {
        pods: reflect(&client, changed.clone()),
        service_accounts: reflect(&client, changed.clone()),
        namespaces: reflect(&client, changed.clone()),
        nodes: reflect(&client, changed.clone()),
        network_policies: reflect(&client, changed.clone()),
        keyway_policies: reflect(&client, changed.clone()),
    };
    tokio::select! {
        _ = caches.ready() => {
            info!("Kubernetes caches synced");
            cp.metrics().readiness.set_ready(crate::metrics::READY_KUBERNETES_CACHES);
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
    let mut retry: Option<Duration> = None;
    let mut recheck: Option<Duration> = None;
    loop {
        if *leader.borrow_and_update() {
            // Let a burst of events (a rollout, a namespace of pods) land
            // before computing the next state.
            tokio::time::sleep(Duration::from_millis(50)).await;
            match reconcile_once(&cp, &caches, &client, &policies).await {
                Ok(next) => {
                    retry = None;
                    recheck = next;
                }
                Err(e) => {
                    let next = retry.map_or(Duration::from_millis(200), |d| {
                        (d * 2).min(Duration::from_secs(10))
                    });
                    warn!(error = %e, retry_in = ?next, "reconciling the store with Kubernetes failed");
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
            _ = changed.notified() => {}
            _ = leader.changed() => {}
            _ = wait => {}
            _ = shutdown.changed() => return,
        }
    }
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
async fn revoke_deleted_nodes(cp: &ControlPlane, inputs: &Inputs) -> Result<Option<Duration>, String> {
    let live: std::collections::HashSet<String> = inputs.nodes.iter().map(|n| n.name_any()).collect();
    let now = crate::server::now_unix();
    let mut recheck: Option<i64> = None;
    for record in cp
        .registry()
        .records
        .nodes
        .iter()
        .filter(|n| !live.contains(&n.name))
    {
        let age = now - record.attested_at;
        if age >= NODE_GRACE_SECS {
            if cp.revoke_node(&record.name).await.map_err(|e| e.to_string())? {
                info!(node = %record.name, "the Node was deleted: node revoked");
            }
        } else {
            let left = NODE_GRACE_SECS - age;
            recheck = Some(recheck.map_or(left, |r| r.min(left)));
        }
    }
    Ok(recheck.map(|s| Duration::from_secs(s.max(1) as u64)))
}

async fn reconcile_once(
    cp: &ControlPlane,
    caches: &Caches,
    _client: &kube::Client,
    policies: &Api<KeywayNetworkPolicy>,
) -> Result<Option<Duration>, String> {
    let inputs = caches.inputs();
    let td = cp.config().trust_domain.clone();
    let (outcome, mut statuses) = cp
        .reconcile(|stored| {
            let d = desired(&inputs, &td, stored);
            (d.workloads, d.policies, d.statuses)
        })
        .await
        .map_err(|e| e.to_string())?;
    if !outcome.changes.is_empty() {
        info!(
            changes = outcome.changes.len(),
            revision = outcome.revision,
            "store reconciled with Kubernetes"
        );
    }
    // What compiled is decided by the compiler (budgets), after validation.
    let refused = cp.registry().policy.refused.clone();
    for u in statuses.iter_mut().filter(|u| u.result.is_ok()) {
        if let Some(why) = refused.get(&format!("{}/{}", u.namespace, u.name)) {
            u.result = Err(PolicyRefusal::OverBudget(why.clone()));
        }
    }
    for update in statuses.iter().filter(|u| !u.is_current()) {
        write_status(policies, update).await?;
    }
    revoke_deleted_nodes(cp, &inputs).await
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

async fn write_status(policies: &Api<KeywayNetworkPolicy>, update: &StatusUpdate) -> Result<(), String> {
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
        Err(e) => Err(format!(
            "cannot write the status of KeywayNetworkPolicy {}/{}: {e}",
            update.namespace, update.name
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
