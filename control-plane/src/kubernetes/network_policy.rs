//! A networking.k8s.io NetworkPolicy as a KeywayNetworkPolicy: translated
//! into the CRD's spec ([`crate::crd`], without authentication) and validated
//! by the same `PolicySpec::try_from` every policy goes through.
//!
//! - `podSelector` selects endpoints in the policy's namespace.
//! - A peer's `namespaceSelector` matches namespace labels (carried on every
//!   workload as `io.kubernetes.pod.namespace.labels.<key>`); `{}` means every
//!   namespace. Without it a peer's `podSelector` picks from the policy's
//!   namespace.
//! - An absent or empty `from`/`to` allows every peer; absent `ports` every port.
//! - `policyTypes` left out means Ingress, plus Egress when there are egress
//!   rules, as the API server defaults it.
//! - `ipBlock` peers and named ports are not enforced (Keyway matches
//!   identities, not CIDRs, and a pod's named ports are not in its identity):
//!   such a peer or port is left out, which fails closed. A rule left with no
//!   peer or no port allows nothing.
//! - A policy the validator refuses is not dropped, which would leave its
//!   pods open: it selects what its `podSelector` selects (every pod of its
//!   namespace when that cannot be read either) and allows nothing in the
//!   directions it names, until it is fixed ([`network_policy`]).
//!
//! The translator is security-relevant: what it widens and what it refuses
//! is pinned by the tests below, one per case.

use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector as K8sSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use tracing::warn;

use crate::crd;
use crate::model::PolicyRecord;
use crate::model::policy::{
    InvalidSpec, NAMESPACE_LABEL, NAMESPACE_LABELS_PREFIX, PolicySpec, is_pseudo_label,
};

/// Prefix of the store names of policies that come from a networking.k8s.io
/// NetworkPolicy. `:` cannot appear in a Kubernetes object name, so these
/// never collide with a KeywayNetworkPolicy of the same name.
pub const NETWORK_POLICY_PREFIX: &str = "networkpolicy:";

/// The policy record a NetworkPolicy stands for, and why it is refused when
/// it is: then the record fails closed (see the module docs), and the caller
/// says why.
pub fn network_policy(np: &NetworkPolicy) -> (PolicyRecord, Option<InvalidSpec>) {
    let record = |spec| PolicyRecord {
        namespace: np.namespace().unwrap_or_default(),
        name: format!("{NETWORK_POLICY_PREFIX}{}", np.name_any()),
        spec,
    };
    match translate(np) {
        Ok(spec) => (record(spec), None),
        Err(e) => (record(allow_nothing(np)), Some(e)),
    }
}

/// What `policyTypes` says, or what the API server defaults it to (when it
/// is left out or empty).
fn policy_types(spec: &NetworkPolicySpec) -> Vec<&str> {
    match &spec.policy_types {
        Some(types) if !types.is_empty() => types.iter().map(String::as_str).collect(),
        _ if spec.egress.as_ref().is_some_and(|e| !e.is_empty()) => vec!["Ingress", "Egress"],
        _ => vec!["Ingress"],
    }
}

/// A refused policy's stand-in: its pods, or every pod of its namespace when
/// its pod selector is what cannot be read, allowed nothing in the
/// directions it names (ingress alone when it has no spec).
fn allow_nothing(np: &NetworkPolicy) -> PolicySpec {
    let types = np.spec.as_ref().map_or_else(|| vec!["Ingress"], policy_types);
    let nothing = |direction| types.contains(&direction).then(Vec::new);
    let endpoint_selector = np
        .spec
        .as_ref()
        .and_then(|s| s.pod_selector.as_ref())
        .filter(|sel| pseudo_label_key(sel).is_none())
        .map(|sel| selector(Some(sel), None))
        .and_then(|raw| {
            PolicySpec::try_from(&crd::KeywayNetworkPolicySpec {
                endpoint_selector: raw,
                ingress: None,
                egress: None,
            })
            .ok()
        })
        .map(|s| s.endpoint_selector)
        .unwrap_or_default();
    PolicySpec {
        endpoint_selector,
        ingress: nothing("Ingress"),
        egress: nothing("Egress"),
    }
}

fn translate(np: &NetworkPolicy) -> Result<PolicySpec, InvalidSpec> {
    let spec = np
        .spec
        .as_ref()
        .ok_or_else(|| InvalidSpec("spec is missing".into()))?;
    let types = policy_types(spec);
    pod_label_keys(spec, &types)?;
    let ingress = types.contains(&"Ingress").then(|| {
        spec.ingress
            .iter()
            .flatten()
            .filter_map(|r| {
                let (endpoints, entities, to_ports) = rule(r.from.as_deref(), r.ports.as_deref())?;
                Some(crd::IngressRule {
                    authentication: None,
                    from_endpoints: endpoints,
                    from_entities: entities,
                    to_ports,
                })
            })
            .collect()
    });
    let egress = types.contains(&"Egress").then(|| {
        spec.egress
            .iter()
            .flatten()
            .filter_map(|r| {
                let (endpoints, entities, to_ports) = rule(r.to.as_deref(), r.ports.as_deref())?;
                Some(crd::EgressRule {
                    authentication: None,
                    to_endpoints: endpoints,
                    to_entities: entities,
                    to_ports,
                })
            })
            .collect()
    });
    let raw = crd::KeywayNetworkPolicySpec {
        endpoint_selector: selector(spec.pod_selector.as_ref(), None),
        ingress,
        egress,
    };
    PolicySpec::try_from(&raw)
}

/// Refuses a pod selector that names a key spelt like a pseudo label
/// (`io.kubernetes.pod.namespace...`, `io.kubernetes.pod.serviceaccount`).
/// Kubernetes matches it against the pod's own labels, which Keyway never
/// takes such a key from (a pod could otherwise claim another namespace's
/// labels), and next to a namespace selector it would merge with the
/// namespace's labels: either way not what the policy says.
/// Only the directions the policy names (`types`) are read, as Kubernetes
/// reads them.
fn pod_label_keys(spec: &NetworkPolicySpec, types: &[&str]) -> Result<(), InvalidSpec> {
    let ingress_peers = (spec.ingress.iter().flatten().filter_map(|r| r.from.as_ref()))
        .filter(|_| types.contains(&"Ingress"));
    let egress_peers =
        (spec.egress.iter().flatten().filter_map(|r| r.to.as_ref())).filter(|_| types.contains(&"Egress"));
    let selectors = ingress_peers
        .chain(egress_peers)
        .flatten()
        .filter_map(|p| p.pod_selector.as_ref())
        .chain(spec.pod_selector.as_ref());
    match selectors.filter_map(pseudo_label_key).next() {
        Some(key) => Err(InvalidSpec(format!(
            "podSelector: {key:?} is spelt like a pseudo label (Keyway's or Cilium's), which is never taken from a pod's \
             labels; select namespaces with namespaceSelector"
        ))),
        None => Ok(()),
    }
}

/// The first key of `sel` spelt like a pseudo label.
fn pseudo_label_key(sel: &K8sSelector) -> Option<&String> {
    sel.match_labels
        .iter()
        .flatten()
        .map(|(k, _)| k)
        .chain(sel.match_expressions.iter().flatten().map(|r| &r.key))
        .find(|k| is_pseudo_label(k))
}

/// A rule's peers (as endpoint selectors or entities) and ports, or `None`
/// when nothing of it can be enforced: then it allows nothing, like a rule
/// whose peers all fail to match.
type RuleParts = (
    Option<Vec<crd::LabelSelector>>,
    Option<Vec<String>>,
    Option<Vec<crd::PortRule>>,
);

fn rule(peers: Option<&[NetworkPolicyPeer]>, ports: Option<&[NetworkPolicyPort]>) -> Option<RuleParts> {
    let (endpoints, entities) = match peers {
        // No peer named: every peer, in or out of the cluster.
        None | Some([]) => (None, Some(vec!["all".to_string()])),
        Some(peers) => {
            let selectors: Vec<crd::LabelSelector> = peers
                .iter()
                .filter_map(|p| {
                    if p.ip_block.is_some() {
                        warn!("NetworkPolicy ipBlock peers are not enforced by Keyway; the peer is left out (fails closed)");
                        return None;
                    }
                    Some(selector(p.pod_selector.as_ref(), p.namespace_selector.as_ref()))
                })
                .collect();
            if selectors.is_empty() {
                return None;
            }
            (Some(selectors), None)
        }
    };
    let to_ports = match ports.filter(|p| !p.is_empty()) {
        None => None,
        Some(ports) => {
            let list: Vec<crd::PortProtocol> = ports.iter().filter_map(port).collect();
            if list.is_empty() {
                return None;
            }
            Some(vec![crd::PortRule { ports: list }])
        }
    };
    Some((endpoints, entities, to_ports))
}

/// One NetworkPolicy port; `None` for a named port (not enforced).
fn port(p: &NetworkPolicyPort) -> Option<crd::PortProtocol> {
    let protocol = Some(p.protocol.clone().unwrap_or_else(|| "TCP".into()));
    let (port, end_port) = match &p.port {
        // No port: every port of the protocol.
        None => (None, None),
        // A range stays a range: it compiles to one entry per 256 ports, and
        // the policy budget bounds the rest.
        Some(IntOrString::Int(n)) => (
            Some(crd::PortValue::Number(i64::from(*n))),
            p.end_port
                .filter(|end| end > n)
                .map(|end| crd::PortValue::Number(i64::from(end))),
        ),
        Some(IntOrString::String(s)) => match s.parse::<u16>() {
            Ok(n) => (Some(crd::PortValue::Number(i64::from(n))), None),
            Err(_) => {
                warn!(port = %s, "NetworkPolicy named ports are not enforced by Keyway; left out (fails closed)");
                return None;
            }
        },
    };
    Some(crd::PortProtocol {
        port,
        end_port,
        protocol,
    })
}

/// A pod selector, optionally combined with a namespace selector, as one
/// KeywayNetworkPolicy selector.
fn selector(pods: Option<&K8sSelector>, namespaces: Option<&K8sSelector>) -> crd::LabelSelector {
    let mut labels = std::collections::BTreeMap::new();
    let mut exprs = Vec::new();
    let mut add = |sel: &K8sSelector, prefix: &str| {
        for (k, v) in sel.match_labels.iter().flatten() {
            labels.insert(format!("{prefix}{k}"), v.clone());
        }
        for r in sel.match_expressions.iter().flatten() {
            exprs.push(crd::LabelSelectorRequirement {
                key: format!("{prefix}{}", r.key),
                operator: r.operator.clone(),
                values: r.values.clone(),
            });
        }
    };
    if let Some(sel) = pods {
        add(sel, "");
    }
    if let Some(sel) = namespaces {
        add(sel, NAMESPACE_LABELS_PREFIX);
        // `namespaceSelector: {}` selects every namespace.
        exprs.push(crd::LabelSelectorRequirement {
            key: NAMESPACE_LABEL.into(),
            operator: "Exists".into(),
            values: None,
        });
    }
    crd::LabelSelector {
        match_labels: (!labels.is_empty()).then_some(labels),
        match_expressions: (!exprs.is_empty()).then_some(exprs),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::policy::{Entity, Operator, PortProtocol, Protocol, Rule, Selector};

    fn translate(spec: serde_json::Value) -> (PolicyRecord, Option<InvalidSpec>) {
        let np: NetworkPolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": { "name": "np", "namespace": "shop" },
            "spec": spec,
        }))
        .unwrap();
        network_policy(&np)
    }

    /// What an accepted policy compiles to.
    fn spec(spec: serde_json::Value) -> PolicySpec {
        match translate(spec) {
            (record, None) => record.spec,
            (_, Some(e)) => panic!("refused: {e}"),
        }
    }

    fn only_rule(rules: Option<&[Rule]>) -> &Rule {
        match rules {
            Some([rule]) => rule,
            other => panic!("want one rule, got {other:?}"),
        }
    }

    #[test]
    fn the_record_is_named_apart_from_keyway_policies_and_selects_in_its_namespace() {
        let (record, refused) =
            translate(serde_json::json!({ "podSelector": { "matchLabels": { "app": "db" } } }));
        assert!(refused.is_none());
        assert_eq!(record.key(), "shop/networkpolicy:np");
        assert_eq!(record.spec.endpoint_selector.match_labels["app"], "db");
        assert!(!record.spec.endpoint_selector.constrains_namespace());
    }

    #[test]
    fn without_policy_types_ingress_is_isolated_and_egress_only_when_it_has_rules() {
        // No rules at all: ingress isolated (nothing allowed), egress untouched.
        let s = spec(serde_json::json!({ "podSelector": {} }));
        assert_eq!(s.ingress, Some(vec![]));
        assert_eq!(s.egress, None);
        // An empty egress list is no egress rule: egress untouched.
        let s = spec(serde_json::json!({ "podSelector": {}, "egress": [] }));
        assert_eq!(s.egress, None);
        // Egress rules present: egress isolated too (this one allows all).
        let s = spec(serde_json::json!({ "podSelector": {}, "egress": [{}] }));
        assert_eq!(s.ingress, Some(vec![]));
        assert_eq!(only_rule(s.egress.as_deref()).entities, Some(vec![Entity::All]));
        // Explicit Egress only: ingress untouched even though rules are listed.
        let s = spec(serde_json::json!({
            "podSelector": {},
            "policyTypes": ["Egress"],
            "ingress": [{}],
        }));
        assert_eq!(s.ingress, None);
        assert_eq!(s.egress, Some(vec![]));
        // An empty list is defaulted, as the API server does: it isolates.
        let s = spec(serde_json::json!({ "podSelector": {}, "policyTypes": [] }));
        assert_eq!((s.ingress, s.egress), (Some(vec![]), None));
        // A direction the policy does not name is not read at all, a pod
        // selector Keyway would refuse included.
        let s = spec(serde_json::json!({
            "podSelector": {},
            "policyTypes": ["Egress"],
            "ingress": [{ "from": [{ "podSelector": { "matchLabels": { "io.kubernetes.pod.serviceaccount": "x" } } }] }],
        }));
        assert_eq!((s.ingress, s.egress), (None, Some(vec![])));
    }

    #[test]
    fn an_absent_or_empty_peer_list_widens_to_every_peer() {
        for from in [serde_json::json!(null), serde_json::json!([])] {
            let s = spec(serde_json::json!({ "podSelector": {}, "ingress": [{ "from": from }] }));
            let rule = only_rule(s.rules(crate::model::policy::Direction::Ingress));
            assert_eq!(rule.entities, Some(vec![Entity::All]), "from: {from}");
            assert_eq!(rule.endpoints, None);
            assert_eq!(rule.ports, None, "no ports listed: every port");
        }
    }

    #[test]
    fn ip_block_peers_are_left_out_and_a_rule_of_only_ip_blocks_allows_nothing() {
        let s = spec(serde_json::json!({
            "podSelector": {},
            "ingress": [
                { "from": [{ "ipBlock": { "cidr": "10.0.0.0/8" } }] },
                { "from": [
                    { "ipBlock": { "cidr": "0.0.0.0/0" } },
                    { "podSelector": { "matchLabels": { "app": "web" } } },
                ] },
            ],
        }));
        // The first rule is gone, not widened; the second keeps its pod peer.
        let rule = only_rule(s.ingress.as_deref());
        let peers = rule.endpoints.as_ref().unwrap();
        assert_eq!(peers.len(), 1);
        assert_eq!(peers[0].match_labels["app"], "web");
        assert_eq!(rule.entities, None);
        // Its only rule gone, the policy still isolates: nothing is allowed.
        let s = spec(serde_json::json!({
            "podSelector": {},
            "ingress": [{ "from": [{ "ipBlock": { "cidr": "10.0.0.0/8" } }], "ports": [{ "port": 80 }] }],
        }));
        assert_eq!(s.ingress, Some(vec![]));
    }

    #[test]
    fn named_ports_are_left_out_and_a_rule_of_only_named_ports_allows_nothing() {
        let s = spec(serde_json::json!({
            "podSelector": {},
            "egress": [
                { "ports": [{ "port": "http" }] },
                { "ports": [{ "port": "metrics" }, { "port": 8443 }] },
            ],
        }));
        let rule = only_rule(s.egress.as_deref());
        assert_eq!(rule.ports, Some(vec![PortProtocol::single(8443, Protocol::Tcp)]));
        assert_eq!(
            s.egress.as_ref().map(Vec::len),
            Some(1),
            "the all-named rule allows nothing"
        );
    }

    #[test]
    fn ports_default_to_tcp_and_a_port_left_out_is_every_port_of_its_protocol() {
        let s = spec(serde_json::json!({
            "podSelector": {},
            "ingress": [{ "ports": [{ "port": 53 }, { "protocol": "UDP" }, { "protocol": "SCTP", "port": 9 }] }],
        }));
        let rule = only_rule(s.ingress.as_deref());
        assert_eq!(
            rule.ports,
            Some(vec![
                PortProtocol::single(53, Protocol::Tcp),
                PortProtocol::single(0, Protocol::Udp),
                PortProtocol::single(9, Protocol::Sctp),
            ])
        );
    }

    #[test]
    fn an_end_port_makes_a_range_only_above_a_numeric_port() {
        let s = spec(serde_json::json!({
            "podSelector": {},
            "ingress": [{ "ports": [
                { "port": 8000, "endPort": 8100 },
                { "port": 9000, "endPort": 9000 },
                { "port": "7000", "endPort": 7100 },
            ] }],
        }));
        let rule = only_rule(s.ingress.as_deref());
        let ranges: Vec<(u16, Option<u16>)> = rule
            .ports
            .iter()
            .flatten()
            .map(|p| (p.port, p.end_port))
            .collect();
        // A string port with an endPort keeps only its first port: narrower,
        // never wider, than what was asked.
        assert_eq!(ranges, [(8000, Some(8100)), (9000, None), (7000, None)]);
    }

    #[test]
    fn namespace_selectors_match_namespace_labels_and_empty_means_every_namespace() {
        let s = spec(serde_json::json!({
            "podSelector": {},
            "ingress": [{ "from": [
                { "namespaceSelector": {} },
                { "namespaceSelector": { "matchLabels": { "team": "a" } },
                  "podSelector": { "matchExpressions": [{ "key": "tier", "operator": "In", "values": ["web"] }] } },
                { "podSelector": { "matchLabels": { "app": "web" } } },
            ] }],
        }));
        let peers = only_rule(s.ingress.as_deref()).endpoints.as_ref().unwrap();
        // `{}`: any workload in any namespace (every identity has a namespace).
        assert!(peers[0].match_labels.is_empty());
        assert_eq!(peers[0].match_expressions.len(), 1);
        assert_eq!(peers[0].match_expressions[0].key, NAMESPACE_LABEL);
        assert_eq!(peers[0].match_expressions[0].operator, Operator::Exists);
        assert!(peers[0].constrains_namespace());
        // Labels: the namespace's labels, and the pod part as written.
        assert_eq!(
            peers[1].match_labels[&format!("{NAMESPACE_LABELS_PREFIX}team")],
            "a"
        );
        assert_eq!(peers[1].match_expressions[0].key, "tier");
        assert!(peers[1].constrains_namespace());
        // A pod selector alone picks from the policy's own namespace.
        assert!(!peers[2].constrains_namespace());
    }

    #[test]
    fn a_refused_policy_fails_closed_with_its_reason() {
        // (spec, what the reason names, what the stand-in selects, which
        // directions it isolates)
        let db = || Selector {
            match_labels: [("app".to_string(), "db".to_string())].into(),
            match_expressions: vec![],
        };
        let cases = [
            (
                serde_json::json!({ "podSelector": { "matchExpressions": [{ "key": "app", "operator": "Equals", "values": ["x"] }] } }),
                "spec.endpointSelector.matchExpressions[0].operator",
                // The pod selector itself is what cannot be read: every pod
                // of the namespace.
                Selector::default(),
                (true, false),
            ),
            (
                serde_json::json!({ "podSelector": { "matchLabels": { "app": "db" } }, "ingress": [{ "ports": [{ "port": 70000 }] }] }),
                "spec.ingress[0].toPorts[0].ports[0].port: 70000 is not a port number",
                db(),
                (true, false),
            ),
            (
                serde_json::json!({ "podSelector": { "matchLabels": { "app": "db" } }, "egress": [{ "ports": [{ "port": 80, "protocol": "HTTP" }] }] }),
                "spec.egress[0].toPorts[0].ports[0].protocol: \"HTTP\"",
                db(),
                (true, true),
            ),
            (
                serde_json::json!({ "podSelector": { "matchLabels": { "app": "db" } }, "policyTypes": ["Egress"], "egress": [{ "to": [{ "podSelector": { "matchExpressions": [{ "key": "app", "operator": "In" }] } }] }] }),
                "In needs at least one value",
                db(),
                (false, true),
            ),
            (
                // A pod label spelt like a namespace label, next to a
                // namespace selector naming the same key otherwise.
                serde_json::json!({ "podSelector": {}, "ingress": [{ "from": [{
                    "podSelector": { "matchLabels": { "io.kubernetes.pod.namespace.labels.team": "a" } },
                    "namespaceSelector": { "matchLabels": { "team": "b" } },
                }] }] }),
                "\"io.kubernetes.pod.namespace.labels.team\" is spelt like a pseudo label",
                Selector::default(),
                (true, false),
            ),
            (
                // The policy's own pod selector: Kubernetes would select pods
                // carrying that label; no identity does.
                serde_json::json!({ "podSelector": { "matchExpressions": [{ "key": "io.kubernetes.pod.serviceaccount", "operator": "Exists" }] } }),
                "\"io.kubernetes.pod.serviceaccount\" is spelt like",
                Selector::default(),
                (true, false),
            ),
        ];
        for (spec, want, selects, (ingress, egress)) in cases {
            let (record, refused) = translate(spec.clone());
            let e = refused.unwrap_or_else(|| panic!("{spec} accepted")).to_string();
            assert!(e.contains(want), "{spec}: {e:?} does not mention {want:?}");
            assert_eq!(record.key(), "shop/networkpolicy:np");
            assert_eq!(record.spec.endpoint_selector, selects, "{spec}");
            assert_eq!(record.spec.ingress, ingress.then(Vec::new), "{spec}");
            assert_eq!(record.spec.egress, egress.then(Vec::new), "{spec}");
        }
        let np = NetworkPolicy {
            metadata: kube::api::ObjectMeta {
                name: Some("np".into()),
                namespace: Some("shop".into()),
                ..Default::default()
            },
            spec: None,
        };
        let (record, refused) = network_policy(&np);
        assert_eq!(refused.unwrap().to_string(), "spec is missing");
        assert_eq!(record.spec.endpoint_selector, Selector::default());
        assert_eq!((record.spec.ingress, record.spec.egress), (Some(vec![]), None));
    }
}
