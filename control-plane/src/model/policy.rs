//! A KeywayNetworkPolicy as the control plane holds it once validated
//! (DESIGN.md section 4): selectors, rules, ports, entities. What it means
//! for the datapath is [`crate::policy`]'s business. It is made from the one
//! raw shape, the CRD's spec ([`crate::crd`]), by `PolicySpec::try_from`
//! (`validate`), whichever way the policy arrived.

mod validate;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::IdentityRecord;

pub use validate::InvalidSpec;

/// Pseudo label: the identity's namespace (Cilium's name for it).
pub const NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";
/// Prefix of the labels every Kubernetes workload carries for its
/// namespace's labels (what a NetworkPolicy `namespaceSelector` matches).
pub const NAMESPACE_LABELS_PREFIX: &str = "io.kubernetes.pod.namespace.labels.";
/// Pseudo label: the identity's service account.
pub const SERVICE_ACCOUNT_LABEL: &str = "io.kubernetes.pod.serviceaccount";

/// Prefix of Cilium's own pseudo labels (`io.cilium.k8s.policy.serviceaccount`,
/// `io.cilium.k8s.namespace.labels.<key>`, ...). Keyway spells those
/// [`SERVICE_ACCOUNT_LABEL`] and [`NAMESPACE_LABELS_PREFIX`]; a selector
/// naming Cilium's spelling is refused, so that a policy copied from Cilium
/// cannot end up matching a label any pod can give itself.
pub const CILIUM_LABELS_PREFIX: &str = "io.cilium.k8s.";

/// Whether `key` is spelt like a pseudo label (Keyway's, a namespace label,
/// or Cilium's): what the control plane sets from the pod's namespace and
/// service account, so never taken from the pod's own labels.
pub fn is_pseudo_label(key: &str) -> bool {
    key == NAMESPACE_LABEL
        || key == SERVICE_ACCOUNT_LABEL
        || key.starts_with(NAMESPACE_LABELS_PREFIX)
        || key.starts_with(CILIUM_LABELS_PREFIX)
}

/// Which way traffic flows, seen from the subject endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    /// The subject receives; the peer is the source.
    Ingress,
    /// The subject sends; the peer is the destination.
    Egress,
}

impl Direction {
    pub const BOTH: [Direction; 2] = [Direction::Ingress, Direction::Egress];

    /// The value in a policy key (keyway_common::direction).
    pub fn number(self) -> u32 {
        match self {
            Direction::Ingress => u32::from(keyway_common::direction::INGRESS),
            Direction::Egress => u32::from(keyway_common::direction::EGRESS),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

/// A Kubernetes label selector. Keys are stored normalised: without a `k8s:`
/// source prefix, the two pseudo labels spelled as [`NAMESPACE_LABEL`] and
/// [`SERVICE_ACCOUNT_LABEL`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Selector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<Requirement>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Requirement {
    pub key: String,
    pub operator: Operator,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

/// The value of label `key` on `id`, pseudo labels included.
fn label<'a>(id: &'a IdentityRecord, key: &str) -> Option<&'a str> {
    match key {
        NAMESPACE_LABEL => Some(&id.namespace),
        SERVICE_ACCOUNT_LABEL => Some(&id.service_account),
        _ => id.labels.get(key).map(String::as_str),
    }
}

impl Selector {
    /// Whether `id`'s labels satisfy the selector (namespace scoping is the
    /// caller's business). The empty selector matches everything.
    pub fn matches(&self, id: &IdentityRecord) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| label(id, k) == Some(v.as_str()))
            && self.match_expressions.iter().all(|r| {
                let value = label(id, &r.key);
                match r.operator {
                    Operator::In => value.is_some_and(|v| r.values.iter().any(|x| x == v)),
                    Operator::NotIn => value.is_none_or(|v| r.values.iter().all(|x| x != v)),
                    Operator::Exists => value.is_some(),
                    Operator::DoesNotExist => value.is_none(),
                }
            })
    }

    /// True when the selector says which namespaces it picks from; otherwise
    /// a peer selector picks from the policy's own namespace only.
    pub fn constrains_namespace(&self) -> bool {
        let about_namespace = |k: &str| k == NAMESPACE_LABEL || k.starts_with(NAMESPACE_LABELS_PREFIX);
        self.match_labels.keys().any(|k| about_namespace(k))
            || self.match_expressions.iter().any(|r| about_namespace(&r.key))
    }
}

/// Reserved peers named by `fromEntities` / `toEntities`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Entity {
    /// Outside the cluster (identity 2).
    World,
    /// The local node (identity 1).
    Host,
    /// Other nodes (identity 3).
    RemoteNode,
    /// Every workload identity.
    Cluster,
    /// Anything (peer wildcard 0).
    All,
}

impl Entity {
    pub const NAMES: &'static str = "world, host, remote-node, cluster, all";

    pub fn parse(s: &str) -> Option<Entity> {
        Some(match s {
            "world" => Entity::World,
            "host" => Entity::Host,
            "remote-node" => Entity::RemoteNode,
            "cluster" => Entity::Cluster,
            "all" => Entity::All,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
    Icmp,
    /// TCP and UDP with a port; anything without one.
    Any,
}

impl Protocol {
    pub const NAMES: &'static str = "TCP, UDP, SCTP, ICMP or ANY";

    pub fn parse(s: &str) -> Option<Protocol> {
        Some(match s {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            "SCTP" => Protocol::Sctp,
            "ICMP" => Protocol::Icmp,
            "ANY" => Protocol::Any,
            _ => return None,
        })
    }
}

/// One `ports` item: `port` (0: every port of the protocol), or the range
/// `port..=end_port` when `end_port` is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortProtocol {
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_port: Option<u16>,
    pub protocol: Protocol,
}

impl PortProtocol {
    pub fn single(port: u16, protocol: Protocol) -> Self {
        Self {
            port,
            end_port: None,
            protocol,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    Required,
    #[default]
    Disabled,
}

/// One ingress or egress rule. `None` means the field was left out, which is
/// not the same as an empty list (an empty list selects no peer).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    #[serde(default)]
    pub authentication: AuthMode,
    /// `fromEndpoints` (ingress) or `toEndpoints` (egress).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<Vec<Selector>>,
    /// `fromEntities` (ingress) or `toEntities` (egress).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entities: Option<Vec<Entity>>,
    /// Flattened `toPorts[].ports[]`; `None` when `toPorts` was left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<PortProtocol>>,
}

/// A validated KeywayNetworkPolicy spec. `ingress: Some(vec![])` selects the
/// endpoints for ingress (default deny) without allowing anything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicySpec {
    pub endpoint_selector: Selector,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<Vec<Rule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Vec<Rule>>,
}

impl PolicySpec {
    pub fn rules(&self, direction: Direction) -> Option<&[Rule]> {
        match direction {
            Direction::Ingress => self.ingress.as_deref(),
            Direction::Egress => self.egress.as_deref(),
        }
    }
}
