//! KeywayNetworkPolicy (DESIGN.md section 4): the validated model, and its
//! compilation into the per-identity-pair entries the datapath looks up.
//!
//! Pure: no IO, so every rule of the semantics is tested here. Parsing the
//! YAML documents into this model lives in `registry`.
//!
//! The datapath takes the most specific entry present, in the order
//! (subject, peer, port, proto), (subject, peer, 0, 0), (subject, 0, port,
//! proto), (subject, 0, 0, 0), and drops on a miss. [`compile`] therefore
//! emits a set of entries in which the most specific match always carries the
//! answer the policies give together: allowed when any rule allows, and
//! authenticated when any allowing rule requires it.

use std::collections::{BTreeMap, BTreeSet};

use keyway_common::identity as reserved;
use serde::{Deserialize, Serialize};

use crate::store::{IdentityRecord, PolicyRecord};

/// Pseudo label: the identity's namespace (Cilium's name for it).
pub const NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";
/// Prefix of the labels every Kubernetes workload carries for its
/// namespace's labels (what a NetworkPolicy `namespaceSelector` matches).
pub const NAMESPACE_LABELS_PREFIX: &str = "io.kubernetes.pod.namespace.labels.";
/// Pseudo label: the identity's service account.
pub const SERVICE_ACCOUNT_LABEL: &str = "io.kubernetes.pod.serviceaccount";

/// Rule text of the entry that allows everything to an endpoint no policy selects.
pub const DEFAULT_ALLOW: &str = "default-allow: no policy selects this endpoint";
/// Rule text of the entries that keep the control plane reachable whatever policy says.
pub const EXEMPT_CONTROL_PLANE: &str = "keyway-exempt: control plane";
/// Rule text of the entries that keep the node (agent, kubelet probes) reachable.
pub const EXEMPT_HOST: &str = "keyway-exempt: host (node agent, kubelet probes)";

/// IP protocol numbers as they appear in policy keys; 0 is any.
pub mod ip_proto {
    pub const ANY: u32 = 0;
    pub const ICMP: u32 = 1;
    pub const TCP: u32 = 6;
    pub const UDP: u32 = 17;
    pub const SCTP: u32 = 132;
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

/// One `ports` item. `port` is 0 only where the parser allows it (ICMP, ANY).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortProtocol {
    pub port: u16,
    pub protocol: Protocol,
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

/// A compiled policy key: ports in host order (0 any), IP protocol numbers
/// (0 any), peer 0 any.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub subject: u32,
    pub peer: u32,
    pub port: u32,
    pub protocol: u32,
    pub direction: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub allow: bool,
    pub auth_required: bool,
    /// Which rule decided: `<namespace>/<policy> ingress[<i>]`, or one of
    /// the fixed texts for default-allow and the exemptions.
    pub rule: String,
}

impl Verdict {
    fn allow(auth_required: bool, rule: &str) -> Self {
        Self {
            allow: true,
            auth_required,
            rule: rule.to_owned(),
        }
    }
}

/// Every entry for every subject identity.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompiledPolicy {
    by_subject: BTreeMap<u32, BTreeMap<Key, Verdict>>,
}

impl CompiledPolicy {
    /// The entries whose subject is `subject`, in key order.
    pub fn subject(&self, subject: u32) -> impl Iterator<Item = (&Key, &Verdict)> {
        self.by_subject.get(&subject).into_iter().flatten()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&Key, &Verdict)> {
        self.by_subject.values().flatten()
    }

    pub fn get(&self, key: &Key) -> Option<&Verdict> {
        self.by_subject.get(&key.subject)?.get(key)
    }

    pub fn len(&self) -> usize {
        self.by_subject.values().map(BTreeMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// (peer, port, protocol) within one subject and direction.
type Slot = (u32, u32, u32);

/// A rule with its peers and ports resolved; the same for every subject.
struct ResolvedRule {
    name: String,
    auth_required: bool,
    peers: Vec<u32>,
    ports: Vec<(u32, u32)>,
}

/// A policy with rules in one direction: whom it selects and what it allows.
struct Selecting {
    subjects: BTreeSet<u32>,
    rules: Vec<ResolvedRule>,
}

fn resolve_peers(rule: &Rule, namespace: &str, identities: &[IdentityRecord]) -> Vec<u32> {
    if rule.endpoints.is_none() && rule.entities.is_none() {
        // `{}` (or only `authentication`) allows nothing, as in Cilium where
        // `ingress: [{}]` is the default-deny idiom; a rule with only
        // `toPorts` allows those ports from any peer.
        return if rule.ports.is_some() {
            vec![reserved::UNKNOWN]
        } else {
            Vec::new()
        };
    }
    let mut peers = BTreeSet::new();
    for sel in rule.endpoints.iter().flatten() {
        let scoped = !sel.constrains_namespace();
        peers.extend(
            identities
                .iter()
                .filter(|id| (!scoped || id.namespace == namespace) && sel.matches(id))
                .map(|id| id.id),
        );
    }
    for entity in rule.entities.iter().flatten() {
        match entity {
            Entity::World => {
                peers.insert(reserved::WORLD);
            }
            Entity::Host => {
                peers.insert(reserved::HOST);
            }
            Entity::RemoteNode => {
                peers.insert(reserved::REMOTE_NODE);
            }
            Entity::All => {
                peers.insert(reserved::UNKNOWN);
            }
            Entity::Cluster => peers.extend(identities.iter().map(|id| id.id)),
        }
    }
    peers.into_iter().collect()
}

fn resolve_ports(rule: &Rule) -> Vec<(u32, u32)> {
    let Some(ports) = &rule.ports else {
        return vec![(0, ip_proto::ANY)];
    };
    let mut out = Vec::new();
    for pp in ports {
        let port = u32::from(pp.port);
        match pp.protocol {
            Protocol::Any if port == 0 => out.push((0, ip_proto::ANY)),
            Protocol::Any => {
                out.push((port, ip_proto::TCP));
                out.push((port, ip_proto::UDP));
            }
            Protocol::Tcp => out.push((port, ip_proto::TCP)),
            Protocol::Udp => out.push((port, ip_proto::UDP)),
            Protocol::Sctp => out.push((port, ip_proto::SCTP)),
            // ICMP has no ports; the datapath looks it up with port 0.
            Protocol::Icmp => out.push((0, ip_proto::ICMP)),
        }
    }
    out
}

/// Allows `slot`; when several rules give the same slot, the first rule's
/// name stays and authentication is required if any of them requires it.
fn merge(slots: &mut BTreeMap<Slot, Verdict>, slot: Slot, auth_required: bool, rule: &str) {
    slots
        .entry(slot)
        .and_modify(|v| v.auth_required |= auth_required)
        .or_insert_with(|| Verdict::allow(auth_required, rule));
}

/// Makes the most specific entry the datapath finds carry every
/// authentication requirement of the entries that also cover the packet,
/// adding entries where two partial wildcards overlap.
fn normalise(slots: &mut BTreeMap<Slot, Verdict>) {
    const ANY: (u32, u32) = (0, ip_proto::ANY);
    // (S, 0, 0, 0) covers everything.
    if slots.get(&(0, 0, ip_proto::ANY)).is_some_and(|v| v.auth_required) {
        for v in slots.values_mut() {
            v.auth_required = true;
        }
        return;
    }
    // (S, 0, port, proto) that require authentication.
    let any_peer_auth: BTreeMap<(u32, u32), String> = slots
        .iter()
        .filter(|((peer, port, proto), v)| *peer == 0 && (*port, *proto) != ANY && v.auth_required)
        .map(|((_, port, proto), v)| ((*port, *proto), v.rule.clone()))
        .collect();
    let peer_wide: BTreeMap<u32, bool> = slots
        .iter()
        .filter(|((peer, port, proto), _)| *peer != 0 && (*port, *proto) == ANY)
        .map(|((peer, _, _), v)| (*peer, v.auth_required))
        .collect();
    // (S, P, port, proto) present: covered by (S, P, 0, 0) and (S, 0, port, proto).
    for ((peer, port, proto), v) in slots.iter_mut() {
        if *peer != 0 && (*port, *proto) != ANY {
            v.auth_required |=
                peer_wide.get(peer).copied().unwrap_or(false) || any_peer_auth.contains_key(&(*port, *proto));
        }
    }
    // (S, P, 0, 0) without authentication would shadow an authenticated
    // (S, 0, port, proto) for peer P: add the authenticated (S, P, port, proto).
    for (&peer, _) in peer_wide.iter().filter(|(_, auth)| !**auth) {
        for (&(port, proto), rule) in &any_peer_auth {
            slots
                .entry((peer, port, proto))
                .or_insert_with(|| Verdict::allow(true, rule));
        }
    }
}

/// Compiles `policies` for `identities` (the identities in use; peers are
/// resolved among them too). Deterministic: policies are taken in
/// namespace/name order, rules in order.
pub fn compile(identities: &[IdentityRecord], policies: &[PolicyRecord]) -> CompiledPolicy {
    let mut policies: Vec<&PolicyRecord> = policies.iter().collect();
    policies.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));

    // Per direction: for each policy that has rules in that direction, the
    // subjects it selects and its resolved rules.
    let mut selecting: BTreeMap<Direction, Vec<Selecting>> = BTreeMap::new();
    for direction in Direction::BOTH {
        let list = selecting.entry(direction).or_default();
        for p in &policies {
            let Some(rules) = p.spec.rules(direction) else {
                continue;
            };
            let subjects: BTreeSet<u32> = identities
                .iter()
                .filter(|id| id.namespace == p.namespace && p.spec.endpoint_selector.matches(id))
                .map(|id| id.id)
                .collect();
            if subjects.is_empty() {
                continue;
            }
            let rules = rules
                .iter()
                .enumerate()
                .map(|(i, rule)| ResolvedRule {
                    name: format!("{}/{} {}[{i}]", p.namespace, p.name, direction.name()),
                    auth_required: rule.authentication == AuthMode::Required,
                    peers: resolve_peers(rule, &p.namespace, identities),
                    ports: resolve_ports(rule),
                })
                .collect();
            list.push(Selecting { subjects, rules });
        }
    }

    let mut out = CompiledPolicy::default();
    for id in identities {
        let entries = out.by_subject.entry(id.id).or_default();
        for direction in Direction::BOTH {
            let mut slots: BTreeMap<Slot, Verdict> = BTreeMap::new();
            let mut selected = false;
            for policy in &selecting[&direction] {
                if !policy.subjects.contains(&id.id) {
                    continue;
                }
                selected = true;
                for rule in &policy.rules {
                    for &peer in &rule.peers {
                        for &(port, proto) in &rule.ports {
                            merge(&mut slots, (peer, port, proto), rule.auth_required, &rule.name);
                        }
                    }
                }
            }
            if selected {
                normalise(&mut slots);
            } else {
                slots.insert((0, 0, ip_proto::ANY), Verdict::allow(false, DEFAULT_ALLOW));
            }
            // Policy can neither cut off nor demand authentication from the
            // control plane and the node itself.
            slots.retain(|(peer, _, _), _| *peer != reserved::HOST && *peer != reserved::CONTROL_PLANE);
            slots.insert(
                (reserved::CONTROL_PLANE, 0, ip_proto::ANY),
                Verdict::allow(false, EXEMPT_CONTROL_PLANE),
            );
            slots.insert(
                (reserved::HOST, 0, ip_proto::ANY),
                Verdict::allow(false, EXEMPT_HOST),
            );
            for ((peer, port, protocol), verdict) in slots {
                entries.insert(
                    Key {
                        subject: id.id,
                        peer,
                        port,
                        protocol,
                        direction: direction.number(),
                    },
                    verdict,
                );
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const IN: u32 = 0;
    const EG: u32 = 1;

    fn ident(id: u32, ns: &str, sa: &str, labels: &[(&str, &str)]) -> IdentityRecord {
        IdentityRecord {
            id,
            spiffe_id: format!("spiffe://td/ns/{ns}/sa/{sa}"),
            namespace: ns.into(),
            service_account: sa.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn app(app: &str) -> Selector {
        Selector {
            match_labels: BTreeMap::from([("app".into(), app.into())]),
            ..Default::default()
        }
    }

    fn tcp(port: u16) -> PortProtocol {
        PortProtocol {
            port,
            protocol: Protocol::Tcp,
        }
    }

    fn policy(ns: &str, name: &str, spec: PolicySpec) -> PolicyRecord {
        PolicyRecord {
            namespace: ns.into(),
            name: name.into(),
            spec,
        }
    }

    fn from(sel: Selector, ports: Option<Vec<PortProtocol>>, auth: AuthMode) -> Rule {
        Rule {
            authentication: auth,
            endpoints: Some(vec![sel]),
            entities: None,
            ports,
        }
    }

    fn key(subject: u32, peer: u32, port: u32, protocol: u32, direction: u32) -> Key {
        Key {
            subject,
            peer,
            port,
            protocol,
            direction,
        }
    }

    /// (peer, port, proto, allow, auth) for one subject and direction, sorted.
    fn entries(c: &CompiledPolicy, subject: u32, direction: u32) -> Vec<(u32, u32, u32, bool)> {
        c.subject(subject)
            .filter(|(k, _)| k.direction == direction)
            .map(|(k, v)| {
                assert!(v.allow);
                (k.peer, k.port, k.protocol, v.auth_required)
            })
            .collect()
    }

    /// What the datapath would decide: the most specific entry present.
    fn lookup(c: &CompiledPolicy, s: u32, p: u32, port: u32, proto: u32, dir: u32) -> Option<&Verdict> {
        [(p, port, proto), (p, 0, 0), (0, port, proto), (0, 0, 0)]
            .into_iter()
            .find_map(|(peer, port, protocol)| c.get(&key(s, peer, port, protocol, dir)))
    }

    fn ids() -> Vec<IdentityRecord> {
        vec![
            ident(256, "default", "frontend", &[("app", "frontend")]),
            ident(257, "default", "api", &[("app", "api")]),
            ident(258, "other", "frontend", &[("app", "frontend")]),
            ident(259, "default", "intruder", &[("app", "other")]),
        ]
    }

    /// The policy of DESIGN.md section 4.
    fn api_mtls(auth: AuthMode) -> PolicyRecord {
        policy(
            "default",
            "api-mtls",
            PolicySpec {
                endpoint_selector: app("api"),
                ingress: Some(vec![from(app("frontend"), Some(vec![tcp(8080)]), auth)]),
                egress: None,
            },
        )
    }

    #[test]
    fn no_policy_allows_everything_plus_exemptions() {
        let c = compile(&ids(), &[]);
        for dir in [IN, EG] {
            assert_eq!(
                entries(&c, 256, dir),
                vec![(0, 0, 0, false), (1, 0, 0, false), (4, 0, 0, false)]
            );
        }
        assert_eq!(c.get(&key(256, 0, 0, 0, IN)).unwrap().rule, DEFAULT_ALLOW);
        assert_eq!(c.get(&key(256, 4, 0, 0, EG)).unwrap().rule, EXEMPT_CONTROL_PLANE);
        assert_eq!(c.get(&key(256, 1, 0, 0, EG)).unwrap().rule, EXEMPT_HOST);
        assert_eq!(c.len(), 4 * 6);
    }

    #[test]
    fn a_selected_endpoint_is_default_deny_in_that_direction_only() {
        let c = compile(&ids(), &[api_mtls(AuthMode::Required)]);
        // api ingress: only frontend (same namespace) on 8080/TCP, with auth.
        assert_eq!(
            entries(&c, 257, IN),
            vec![(1, 0, 0, false), (4, 0, 0, false), (256, 8080, 6, true)]
        );
        let v = c.get(&key(257, 256, 8080, 6, IN)).unwrap();
        assert_eq!(v.rule, "default/api-mtls ingress[0]");
        // Egress is not selected: default allow.
        assert_eq!(
            entries(&c, 257, EG),
            vec![(0, 0, 0, false), (1, 0, 0, false), (4, 0, 0, false)]
        );
        // Others are untouched.
        assert_eq!(entries(&c, 256, IN)[0], (0, 0, 0, false));
        // The datapath's view: intruder denied, frontend on another port denied.
        assert!(lookup(&c, 257, 259, 8080, 6, IN).is_none());
        assert!(lookup(&c, 257, 256, 8081, 6, IN).is_none());
        assert!(lookup(&c, 257, 256, 8080, 17, IN).is_none());
        assert!(lookup(&c, 257, 256, 8080, 6, IN).unwrap().auth_required);
        assert!(!lookup(&c, 257, 4, 8080, 6, IN).unwrap().auth_required);
    }

    #[test]
    fn an_empty_ingress_list_selects_and_denies() {
        let p = policy(
            "default",
            "deny",
            PolicySpec {
                endpoint_selector: Selector::default(),
                ingress: Some(vec![]),
                egress: None,
            },
        );
        let c = compile(&ids(), &[p]);
        for id in [256, 257, 259] {
            assert_eq!(entries(&c, id, IN), vec![(1, 0, 0, false), (4, 0, 0, false)]);
            assert_eq!(entries(&c, id, EG)[0], (0, 0, 0, false));
        }
        // Another namespace's endpoint is not selected by a policy in default.
        assert_eq!(entries(&c, 258, IN)[0], (0, 0, 0, false));
    }

    #[test]
    fn an_empty_rule_allows_nothing_and_ports_alone_allow_any_peer() {
        let spec = |rule: Rule| PolicySpec {
            endpoint_selector: app("api"),
            ingress: Some(vec![rule]),
            egress: None,
        };
        let c = compile(&ids(), &[policy("default", "p", spec(Rule::default()))]);
        assert_eq!(entries(&c, 257, IN), vec![(1, 0, 0, false), (4, 0, 0, false)]);
        let ports_only = Rule {
            ports: Some(vec![tcp(80)]),
            ..Default::default()
        };
        let c = compile(&ids(), &[policy("default", "p", spec(ports_only))]);
        assert_eq!(
            entries(&c, 257, IN),
            vec![(0, 80, 6, false), (1, 0, 0, false), (4, 0, 0, false)]
        );
        let peers_only = from(app("frontend"), None, AuthMode::Disabled);
        let c = compile(&ids(), &[policy("default", "p", spec(peers_only))]);
        assert_eq!(
            entries(&c, 257, IN),
            vec![(1, 0, 0, false), (4, 0, 0, false), (256, 0, 0, false)]
        );
    }

    #[test]
    fn peers_are_scoped_to_the_policy_namespace_unless_the_selector_names_one() {
        let mut other_ns = app("frontend");
        other_ns
            .match_labels
            .insert(NAMESPACE_LABEL.into(), "other".into());
        let any_ns = Selector {
            match_labels: BTreeMap::from([("app".into(), "frontend".into())]),
            match_expressions: vec![Requirement {
                key: NAMESPACE_LABEL.into(),
                operator: Operator::Exists,
                values: vec![],
            }],
        };
        let peers = |sel: Selector| {
            let p = policy(
                "default",
                "p",
                PolicySpec {
                    endpoint_selector: app("api"),
                    ingress: Some(vec![from(sel, None, AuthMode::Disabled)]),
                    egress: None,
                },
            );
            let c = compile(&ids(), &[p]);
            entries(&c, 257, IN)
                .into_iter()
                .map(|e| e.0)
                .filter(|p| *p >= 256)
                .collect::<Vec<_>>()
        };
        assert_eq!(peers(app("frontend")), vec![256]);
        assert_eq!(peers(other_ns), vec![258]);
        assert_eq!(peers(any_ns), vec![256, 258]);
    }

    #[test]
    fn pseudo_labels_and_expressions_select() {
        let sa = Selector {
            match_labels: BTreeMap::from([(SERVICE_ACCOUNT_LABEL.into(), "intruder".into())]),
            ..Default::default()
        };
        let not_frontend = Selector {
            match_expressions: vec![Requirement {
                key: "app".into(),
                operator: Operator::NotIn,
                values: vec!["frontend".into()],
            }],
            ..Default::default()
        };
        let no_app = Selector {
            match_expressions: vec![Requirement {
                key: "app".into(),
                operator: Operator::DoesNotExist,
                values: vec![],
            }],
            ..Default::default()
        };
        let in_set = Selector {
            match_expressions: vec![Requirement {
                key: "app".into(),
                operator: Operator::In,
                values: vec!["api".into(), "other".into()],
            }],
            ..Default::default()
        };
        let all = ids();
        let pick = |s: &Selector| {
            all.iter()
                .filter(|i| s.matches(i))
                .map(|i| i.id)
                .collect::<Vec<_>>()
        };
        assert_eq!(pick(&sa), vec![259]);
        assert_eq!(pick(&not_frontend), vec![257, 259]);
        assert_eq!(pick(&no_app), Vec::<u32>::new());
        assert_eq!(pick(&in_set), vec![257, 259]);
        assert_eq!(pick(&Selector::default()), vec![256, 257, 258, 259]);
        // An endpointSelector naming another namespace selects nothing: the
        // policy's own namespace always applies to its subjects.
        let p = policy(
            "default",
            "p",
            PolicySpec {
                endpoint_selector: Selector {
                    match_labels: BTreeMap::from([(NAMESPACE_LABEL.into(), "other".into())]),
                    ..Default::default()
                },
                ingress: Some(vec![]),
                egress: None,
            },
        );
        let c = compile(&all, &[p]);
        assert_eq!(entries(&c, 258, IN)[0], (0, 0, 0, false));
    }

    #[test]
    fn any_protocol_means_tcp_and_udp_and_icmp_has_no_port() {
        let p = policy(
            "default",
            "p",
            PolicySpec {
                endpoint_selector: app("api"),
                ingress: None,
                egress: Some(vec![Rule {
                    ports: Some(vec![
                        PortProtocol {
                            port: 53,
                            protocol: Protocol::Any,
                        },
                        PortProtocol {
                            port: 0,
                            protocol: Protocol::Icmp,
                        },
                        PortProtocol {
                            port: 9000,
                            protocol: Protocol::Sctp,
                        },
                    ]),
                    ..Default::default()
                }]),
            },
        );
        let c = compile(&ids(), &[p]);
        assert_eq!(
            entries(&c, 257, EG),
            vec![
                (0, 0, 1, false),
                (0, 53, 6, false),
                (0, 53, 17, false),
                (0, 9000, 132, false),
                (1, 0, 0, false),
                (4, 0, 0, false)
            ]
        );
    }

    #[test]
    fn overlapping_rules_merge_and_authentication_wins() {
        // Two policies allow frontend on 8080; only the second wants auth.
        let plain = policy(
            "default",
            "a-plain",
            PolicySpec {
                endpoint_selector: app("api"),
                ingress: Some(vec![from(
                    app("frontend"),
                    Some(vec![tcp(8080)]),
                    AuthMode::Disabled,
                )]),
                egress: None,
            },
        );
        let c = compile(&ids(), &[api_mtls(AuthMode::Required), plain.clone()]);
        let v = c.get(&key(257, 256, 8080, 6, IN)).unwrap();
        assert!(v.auth_required);
        assert_eq!(
            v.rule, "default/a-plain ingress[0]",
            "first policy by name keeps its rule name"
        );
    }

    #[test]
    fn a_general_authenticated_rule_covers_the_specific_ones() {
        let spec = |rules: Vec<Rule>| PolicySpec {
            endpoint_selector: app("api"),
            ingress: Some(rules),
            egress: None,
        };
        // Frontend without auth on 8080, and anyone on 8080 with auth:
        // the specific frontend entry must require auth too.
        let any_peer_auth = Rule {
            authentication: AuthMode::Required,
            ports: Some(vec![tcp(8080)]),
            ..Default::default()
        };
        let c = compile(
            &ids(),
            &[policy(
                "default",
                "p",
                spec(vec![
                    from(app("frontend"), Some(vec![tcp(8080)]), AuthMode::Disabled),
                    any_peer_auth.clone(),
                ]),
            )],
        );
        assert!(c.get(&key(257, 256, 8080, 6, IN)).unwrap().auth_required);
        // Frontend on every port without auth, anyone on 8080 with auth: the
        // overlap (frontend, 8080) needs its own authenticated entry, or
        // (api, frontend, 0, 0) would answer for it without auth.
        let c = compile(
            &ids(),
            &[policy(
                "default",
                "p",
                spec(vec![
                    from(app("frontend"), None, AuthMode::Disabled),
                    any_peer_auth,
                ]),
            )],
        );
        let v = lookup(&c, 257, 256, 8080, 6, IN).unwrap();
        assert!(v.auth_required);
        assert_eq!(v.rule, "default/p ingress[1]");
        assert!(!lookup(&c, 257, 256, 9999, 6, IN).unwrap().auth_required);
        assert!(lookup(&c, 257, 259, 8080, 6, IN).unwrap().auth_required);
        assert!(lookup(&c, 257, 259, 9999, 6, IN).is_none());
        // Frontend on every port with auth, frontend on 8080 without: auth.
        let c = compile(
            &ids(),
            &[policy(
                "default",
                "p",
                spec(vec![
                    from(app("frontend"), None, AuthMode::Required),
                    from(app("frontend"), Some(vec![tcp(8080)]), AuthMode::Disabled),
                ]),
            )],
        );
        assert!(lookup(&c, 257, 256, 8080, 6, IN).unwrap().auth_required);
        // Everyone on everything with auth: every entry but the exemptions.
        let all_auth = Rule {
            authentication: AuthMode::Required,
            entities: Some(vec![Entity::All]),
            ..Default::default()
        };
        let c = compile(
            &ids(),
            &[policy(
                "default",
                "p",
                spec(vec![
                    all_auth,
                    from(app("frontend"), Some(vec![tcp(8080)]), AuthMode::Disabled),
                ]),
            )],
        );
        assert_eq!(
            entries(&c, 257, IN),
            vec![
                (0, 0, 0, true),
                (1, 0, 0, false),
                (4, 0, 0, false),
                (256, 8080, 6, true)
            ]
        );
    }

    /// Brute force: for random-ish rule sets, the datapath's most-specific
    /// lookup agrees with the union of the rules.
    #[test]
    fn the_most_specific_entry_always_carries_the_union() {
        let peers = [None, Some(app("frontend")), Some(app("other"))];
        let ports = [None, Some(vec![tcp(80)]), Some(vec![tcp(8080)])];
        let mut rules = Vec::new();
        for p in &peers {
            for pp in &ports {
                for auth in [AuthMode::Disabled, AuthMode::Required] {
                    rules.push(Rule {
                        authentication: auth,
                        endpoints: p.clone().map(|s| vec![s]),
                        entities: None,
                        ports: pp.clone(),
                    });
                }
            }
        }
        // Every combination of up to three rules.
        let n = rules.len();
        for a in 0..n {
            for b in a..n {
                for c in b..n {
                    let set = vec![rules[a].clone(), rules[b].clone(), rules[c].clone()];
                    let p = policy(
                        "default",
                        "p",
                        PolicySpec {
                            endpoint_selector: app("api"),
                            ingress: Some(set.clone()),
                            egress: None,
                        },
                    );
                    let compiled = compile(&ids(), &[p]);
                    for peer in [256, 259, 258] {
                        for port in [80, 8080, 443] {
                            let covering: Vec<&Rule> = set
                                .iter()
                                .filter(|r| {
                                    let peer_ok = match &r.endpoints {
                                        None => r.ports.is_some(),
                                        Some(s) => {
                                            s.iter().any(|s| s.matches(&ids()[(peer - 256) as usize]))
                                                && peer != 258
                                        }
                                    };
                                    let port_ok = match &r.ports {
                                        None => true,
                                        Some(v) => v.iter().any(|pp| u32::from(pp.port) == port),
                                    };
                                    peer_ok && port_ok
                                })
                                .collect();
                            let want = (!covering.is_empty())
                                .then(|| covering.iter().any(|r| r.authentication == AuthMode::Required));
                            let got = lookup(&compiled, 257, peer, port, 6, IN).map(|v| v.auth_required);
                            assert_eq!(got, want, "rules {set:?}, peer {peer}, port {port}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn entities_and_exemptions() {
        let p = policy(
            "default",
            "p",
            PolicySpec {
                endpoint_selector: app("api"),
                ingress: Some(vec![Rule {
                    authentication: AuthMode::Required,
                    entities: Some(vec![Entity::World, Entity::Host, Entity::RemoteNode]),
                    ..Default::default()
                }]),
                egress: Some(vec![Rule {
                    entities: Some(vec![Entity::Cluster]),
                    ports: Some(vec![tcp(443)]),
                    ..Default::default()
                }]),
            },
        );
        let c = compile(&ids(), &[p]);
        // The host stays exempt (no auth demanded of it); world and
        // remote-node are ordinary peers.
        assert_eq!(
            entries(&c, 257, IN),
            vec![
                (1, 0, 0, false),
                (2, 0, 0, true),
                (3, 0, 0, true),
                (4, 0, 0, false)
            ]
        );
        assert_eq!(c.get(&key(257, 1, 0, 0, IN)).unwrap().rule, EXEMPT_HOST);
        // cluster = every workload identity, in every namespace.
        assert_eq!(
            entries(&c, 257, EG),
            vec![
                (1, 0, 0, false),
                (4, 0, 0, false),
                (256, 443, 6, false),
                (257, 443, 6, false),
                (258, 443, 6, false),
                (259, 443, 6, false)
            ]
        );
    }
}
