//! The `KeywayNetworkPolicy` custom resource (group `keyway.dev`, version
//! `v1alpha1`), defined once here in Rust: the one raw shape of a policy.
//! Kubernetes mode reads these objects from the API server, standalone
//! `apply` reads its YAML documents into the same types
//! ([`crate::documents`]), and a networking.k8s.io NetworkPolicy is
//! translated into them ([`crate::kubernetes::network_policy`]). All three
//! become a validated [`crate::model::policy::PolicySpec`] through one
//! `TryFrom`, whose errors name the field.
//!
//! The CRD manifest in the Helm chart is generated from these types
//! (`control-plane crd`), and a test fails when the committed manifest
//! drifts from them. The schema is deliberately structural rather than
//! semantic: the API server checks shapes and types, the control plane checks
//! meaning and reports what it refused as a status condition on the object.
//! Lists have `maxItems`, so the API server itself turns away a document
//! built to make the compiler expand it; what fits is still held to the entry
//! budgets (`crate::policy::Budget`), refused with reason `OverBudget`.

use std::collections::BTreeMap;

use kube::CustomResource;
use kube::CustomResourceExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Spec of a KeywayNetworkPolicy: shaped like a CiliumNetworkPolicy's, so a
/// policy moves over by changing apiVersion and kind.
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "keyway.dev",
    version = "v1alpha1",
    kind = "KeywayNetworkPolicy",
    plural = "keywaynetworkpolicies",
    shortname = "knp",
    namespaced,
    status = "KeywayNetworkPolicyStatus",
    printcolumn = r#"{"name":"Valid","type":"string","jsonPath":".status.conditions[?(@.type==\"Valid\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Valid\")].reason"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct KeywayNetworkPolicySpec {
    /// The endpoints (pods) in the policy's namespace this policy applies to.
    /// `{}` selects every endpoint in the namespace.
    pub endpoint_selector: LabelSelector,
    /// Rules for traffic into the selected endpoints. Present (even empty)
    /// means default deny for ingress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub ingress: Option<Vec<IngressRule>>,
    /// Rules for traffic out of the selected endpoints. Present (even empty)
    /// means default deny for egress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub egress: Option<Vec<EgressRule>>,
}

/// A Kubernetes label selector. Keys may carry a `k8s:` source prefix and use
/// the pseudo labels `io.kubernetes.pod.namespace` and
/// `io.kubernetes.pod.serviceaccount`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub match_labels: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub match_expressions: Option<Vec<LabelSelectorRequirement>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct LabelSelectorRequirement {
    pub key: String,
    /// In, NotIn, Exists or DoesNotExist.
    pub operator: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub values: Option<Vec<String>>,
}

/// Whether traffic a rule allows must also be mutually authenticated.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Authentication {
    /// `required` or `disabled` (the default).
    pub mode: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IngressRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authentication: Option<Authentication>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub from_endpoints: Option<Vec<LabelSelector>>,
    /// world, host, remote-node, cluster or all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 5))]
    pub from_entities: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub to_ports: Option<Vec<PortRule>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EgressRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authentication: Option<Authentication>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub to_endpoints: Option<Vec<LabelSelector>>,
    /// world, host, remote-node, cluster or all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 5))]
    pub to_entities: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub to_ports: Option<Vec<PortRule>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PortRule {
    #[schemars(length(max = 128))]
    pub ports: Vec<PortProtocol>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PortProtocol {
    /// A port number as a string ("8080"); "0" or left out for every port
    /// of the protocol.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>")]
    pub port: Option<PortValue>,
    /// With `port`, the last port of a range (inclusive), as in
    /// NetworkPolicy. A range costs one datapath entry per 256 ports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<u16>")]
    pub end_port: Option<PortValue>,
    /// TCP, UDP, SCTP, ICMP or ANY (the default: TCP and UDP with a port,
    /// every protocol without one). An entry names a port, a protocol or
    /// both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
}

/// A port as written. The API server holds `port` as a string and `endPort`
/// as an integer; a standalone document may write either as either
/// (`port: 53`). Whether it is a port number is the validator's question,
/// so its error can quote what was written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum PortValue {
    Number(i64),
    Text(String),
}

impl<'de> Deserialize<'de> for PortValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = PortValue;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a port number, or a string holding one")
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<PortValue, E> {
                Ok(PortValue::Number(n))
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<PortValue, E> {
                // Beyond i64 is beyond any port; the validator says so.
                Ok(PortValue::Number(i64::try_from(n).unwrap_or(i64::MAX)))
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<PortValue, E> {
                Ok(PortValue::Text(s.to_owned()))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// What the control plane made of the policy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct KeywayNetworkPolicyStatus {
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// A status condition in the Kubernetes convention. Keyway sets one, `Valid`:
/// `True` with reason `Compiled` when the policy is enforced, `False` with
/// reason `InvalidSpec` and the validator's message when it is refused (then
/// the policy changes nothing: the last valid version, if any, stays in force).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// "True", "False" or "Unknown".
    pub status: String,
    pub reason: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// RFC 3339.
    pub last_transition_time: String,
}

/// The CRD manifest as YAML, exactly as committed in the chart
/// (`charts/keyway/crds/keywaynetworkpolicies.yaml`).
pub fn crd_yaml() -> String {
    let crd = KeywayNetworkPolicy::crd();
    let body = serde_yaml::to_string(&crd).expect("a CRD serializes to YAML");
    format!(
        "# Generated from control-plane/src/crd.rs by `control-plane crd`; do not edit.\n\
         # A test fails when this file and the Rust types drift apart.\n{body}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crd_names_and_scope() {
        let crd = KeywayNetworkPolicy::crd();
        assert_eq!(crd.spec.group, "keyway.dev");
        assert_eq!(crd.spec.names.kind, "KeywayNetworkPolicy");
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(crd.spec.versions[0].name, "v1alpha1");
        assert!(
            crd.spec.versions[0]
                .subresources
                .as_ref()
                .is_some_and(|s| s.status.is_some())
        );
    }
}
