//! Standalone-mode documents: `Workload` (DESIGN.md section 9) and
//! `KeywayNetworkPolicy` (section 4) parsed and validated into store records.
//! Kubernetes mode produces the same records from Pods and the policy CRD; a
//! policy document's spec is read into the CRD's own types ([`policy_spec`]).

use std::collections::BTreeMap;
use std::net::IpAddr;

use keyway_identity::{TrustDomain, spiffe_id};
use serde::Deserialize;

use crate::crd;
use crate::model::policy::{Direction, InvalidSpec, PolicySpec};
use crate::model::{DocumentKind, DocumentRef, PolicyRecord, WorkloadRecord};

pub const API_VERSION: &str = "keyway.dev/v1alpha1";

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Document {
    api_version: Option<String>,
    kind: Option<String>,
    #[serde(default)]
    metadata: Metadata,
    #[serde(default)]
    spec: serde_yaml::Value,
}

#[derive(Debug, Default, Deserialize)]
struct Metadata {
    name: Option<String>,
    namespace: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct WorkloadSpec {
    service_account: Option<String>,
    node: Option<String>,
    #[serde(default)]
    ips: Vec<String>,
    #[serde(default)]
    selectors: Vec<String>,
    #[serde(rename = "svidTTL")]
    svid_ttl: Option<String>,
}

/// The documents of one apply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Documents {
    pub workloads: Vec<WorkloadRecord>,
    pub policies: Vec<PolicyRecord>,
}

/// The non-empty documents of a multi-document YAML file, numbered from 1,
/// each with a supported apiVersion and a kind.
fn documents(yaml: &str) -> Result<Vec<(usize, Document, DocumentKind)>, String> {
    let mut out = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(yaml).enumerate() {
        let n = i + 1;
        let value =
            serde_yaml::Value::deserialize(de).map_err(|e| format!("document {n}: not valid YAML: {e}"))?;
        if value.is_null() {
            continue;
        }
        let doc: Document = serde_yaml::from_value(value).map_err(|e| format!("document {n}: {e}"))?;
        match doc.api_version.as_deref() {
            Some(API_VERSION) => {}
            Some(other) => {
                return Err(format!(
                    "document {n}: apiVersion {other:?} is not supported; use {API_VERSION:?}"
                ));
            }
            None => {
                return Err(format!(
                    "document {n}: apiVersion is missing; use {API_VERSION:?}"
                ));
            }
        }
        let kind = match doc.kind.as_deref() {
            Some("Workload") => DocumentKind::Workload,
            Some("KeywayNetworkPolicy") => DocumentKind::KeywayNetworkPolicy,
            Some(other) => {
                return Err(format!(
                    "document {n}: kind {other:?} is not supported by this control plane (supported: Workload, KeywayNetworkPolicy)"
                ));
            }
            None => return Err(format!("document {n}: kind is missing")),
        };
        out.push((n, doc, kind));
    }
    Ok(out)
}

/// Parses every document of a multi-document YAML file. Nothing is returned
/// unless every document is valid: an apply is all or nothing.
pub fn parse_documents(
    yaml: &str,
    td: &TrustDomain,
    max_ttl: std::time::Duration,
) -> Result<Documents, String> {
    let mut out = Documents::default();
    for (n, doc, kind) in documents(yaml)? {
        match kind {
            DocumentKind::Workload => out.workloads.push(workload(n, doc, td, max_ttl)?),
            DocumentKind::KeywayNetworkPolicy => out.policies.push(network_policy(n, doc)?),
        }
    }
    if out.workloads.is_empty() && out.policies.is_empty() {
        return Err("no documents found".into());
    }
    let mut seen = std::collections::BTreeSet::new();
    for w in &out.workloads {
        if !seen.insert(w.key()) {
            return Err(format!("workload {} appears twice in the same apply", w.key()));
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    for p in &out.policies {
        if !seen.insert(p.key()) {
            return Err(format!(
                "KeywayNetworkPolicy {} appears twice in the same apply",
                p.key()
            ));
        }
    }
    Ok(out)
}

/// The documents a `delete -f` names, in file order. Only apiVersion, kind,
/// metadata.name and metadata.namespace (default `default`) are read, so the
/// file that created something also deletes it even if its spec would no
/// longer validate. All or nothing: one bad document refuses the file.
pub fn parse_refs(yaml: &str) -> Result<Vec<DocumentRef>, String> {
    let mut out: Vec<DocumentRef> = Vec::new();
    for (n, doc, kind) in documents(yaml)? {
        let label = match kind {
            DocumentKind::Workload => "Workload",
            DocumentKind::KeywayNetworkPolicy => "KeywayNetworkPolicy",
        };
        let name = doc
            .metadata
            .name
            .ok_or_else(|| format!("document {n} ({label}): metadata.name is missing"))?;
        let namespace = doc.metadata.namespace.unwrap_or_else(|| "default".into());
        let ctx = format!("document {n} ({label} {namespace}/{name})");
        spiffe_id::check_name("metadata.name", &name).map_err(|e| format!("{ctx}: {e}"))?;
        spiffe_id::check_name("metadata.namespace", &namespace).map_err(|e| format!("{ctx}: {e}"))?;
        let r = DocumentRef {
            kind,
            namespace,
            name,
        };
        if out.contains(&r) {
            return Err(format!("{label} {} appears twice in the same file", r.key()));
        }
        out.push(r);
    }
    if out.is_empty() {
        return Err("no documents found".into());
    }
    Ok(out)
}

fn workload(
    n: usize,
    doc: Document,
    td: &TrustDomain,
    max_ttl: std::time::Duration,
) -> Result<WorkloadRecord, String> {
    let name = doc
        .metadata
        .name
        .ok_or_else(|| format!("document {n}: metadata.name is missing"))?;
    let namespace = doc.metadata.namespace.unwrap_or_else(|| "default".into());
    let ctx = format!("document {n} (Workload {namespace}/{name})");
    spiffe_id::check_name("metadata.name", &name).map_err(|e| format!("{ctx}: {e}"))?;
    let spec: WorkloadSpec = serde_yaml::from_value(doc.spec).map_err(|e| format!("{ctx}: spec: {e}"))?;
    let service_account = spec.service_account.unwrap_or_else(|| "default".into());
    let node = spec
        .node
        .ok_or_else(|| format!("{ctx}: spec.node is missing (the node the workload runs on)"))?;
    spiffe_id::check_name("spec.node", &node).map_err(|e| format!("{ctx}: {e}"))?;
    let id = spiffe_id::workload_id(td, &namespace, &service_account).map_err(|e| format!("{ctx}: {e}"))?;
    for (i, ip) in spec.ips.iter().enumerate() {
        ip.parse::<IpAddr>()
            .map_err(|_| format!("{ctx}: spec.ips[{i}] {ip:?} is not an IP address"))?;
    }
    for (i, s) in spec.selectors.iter().enumerate() {
        check_selector(s).map_err(|e| format!("{ctx}: spec.selectors[{i}] {s:?}: {e}"))?;
    }
    let svid_ttl_secs = spec
        .svid_ttl
        .map(|t| {
            let d = keyway_identity::duration::parse(&t).map_err(|e| format!("{ctx}: spec.svidTTL: {e}"))?;
            if d.is_zero() {
                return Err(format!("{ctx}: spec.svidTTL must be greater than zero"));
            }
            if d > max_ttl {
                return Err(format!(
                    "{ctx}: spec.svidTTL {t} exceeds the longest SVID lifetime the CA rotation allows ({})",
                    keyway_identity::duration::format(max_ttl)
                ));
            }
            Ok(d.as_secs().max(1))
        })
        .transpose()?;
    for (k, v) in &doc.metadata.labels {
        if k.is_empty() || k.len() > 317 || v.len() > 63 {
            return Err(format!(
                "{ctx}: label {k:?}={v:?} is not a valid Kubernetes label"
            ));
        }
    }
    Ok(WorkloadRecord {
        namespace,
        name,
        service_account,
        node,
        ips: spec.ips,
        labels: doc.metadata.labels,
        selectors: spec.selectors,
        svid_ttl_secs,
        identity: 0,
        spiffe_id: id.to_string(),
    })
}

fn network_policy(n: usize, doc: Document) -> Result<PolicyRecord, String> {
    let name = doc
        .metadata
        .name
        .ok_or_else(|| format!("document {n} (KeywayNetworkPolicy): metadata.name is missing"))?;
    let namespace = doc.metadata.namespace.unwrap_or_else(|| "default".into());
    let ctx = format!("document {n} (KeywayNetworkPolicy {namespace}/{name})");
    spiffe_id::check_name("metadata.name", &name).map_err(|e| format!("{ctx}: {e}"))?;
    spiffe_id::check_name("metadata.namespace", &namespace).map_err(|e| format!("{ctx}: {e}"))?;
    let spec = policy_spec(doc.spec).map_err(|e| format!("{ctx}: {e}"))?;
    Ok(PolicyRecord {
        namespace,
        name,
        spec,
    })
}

/// Reads a KeywayNetworkPolicy document's spec into the CRD's types (the one
/// raw shape, [`crate::crd`]) and validates it. Errors name the field, e.g.
/// `spec.ingress[0].toPorts[0].ports[0].port`. The API server prunes fields
/// its schema does not know; a document has no such guard, so a field the
/// CRD does not have is refused here, which turns a typo (`fromEndpoint`)
/// into an error instead of a rule that silently allows more.
pub fn policy_spec(spec: serde_yaml::Value) -> Result<PolicySpec, InvalidSpec> {
    if spec.is_null() {
        return Err(InvalidSpec("spec is missing".into()));
    }
    // Absent or null (`endpointSelector:` with its selector commented out):
    // missing, never "select everything".
    let lacks_selector = spec
        .as_mapping()
        .is_some_and(|m| m.get("endpointSelector").is_none_or(serde_yaml::Value::is_null));
    let mut unknown = None;
    let mut track = serde_path_to_error::Track::new();
    let read: Result<crd::KeywayNetworkPolicySpec, _> =
        serde_ignored::deserialize(serde_path_to_error::Deserializer::new(spec, &mut track), |path| {
            unknown.get_or_insert_with(|| unknown_field(&path));
        });
    if let Some(refused) = unknown {
        return Err(refused);
    }
    if lacks_selector {
        return Err(missing_selector());
    }
    match read {
        Ok(raw) => PolicySpec::try_from(&raw),
        Err(e) => {
            let at = track.path().to_string();
            let at = if at == "." {
                "spec".to_owned()
            } else {
                format!("spec.{at}")
            };
            Err(InvalidSpec(format!("{at}: {e}")))
        }
    }
}

fn missing_selector() -> InvalidSpec {
    InvalidSpec(
        "spec.endpointSelector is missing (use `endpointSelector: {}` to select every endpoint in the namespace)"
            .into(),
    )
}

/// The refusal of a field the CRD does not have, at `path`. A rule naming
/// its peers for the other direction (`toEndpoints` in an ingress rule) is
/// told which field it meant.
fn unknown_field(path: &serde_ignored::Path<'_>) -> InvalidSpec {
    fn segments(path: &serde_ignored::Path<'_>, out: &mut Vec<String>) {
        use serde_ignored::Path;
        match path {
            Path::Root => {}
            Path::Seq { parent, index } => {
                segments(parent, out);
                out.push(format!("[{index}]"));
            }
            Path::Map { parent, key } => {
                segments(parent, out);
                out.push(format!(".{key}"));
            }
            Path::Some { parent } | Path::NewtypeStruct { parent } | Path::NewtypeVariant { parent } => {
                segments(parent, out)
            }
        }
    }
    let mut parts = Vec::new();
    segments(path, &mut parts);
    let key = parts.pop().unwrap_or_default();
    let key = key.trim_start_matches('.');
    let parent = format!("spec{}", parts.concat());
    let rule_of = |direction: Direction| {
        parts.len() == 2 && parts[0] == format!(".{}", direction.name()) && parts[1].starts_with('[')
    };
    for (direction, peers, entities, wrong) in [
        (
            Direction::Ingress,
            "fromEndpoints",
            "fromEntities",
            ["toEndpoints", "toEntities"],
        ),
        (
            Direction::Egress,
            "toEndpoints",
            "toEntities",
            ["fromEndpoints", "fromEntities"],
        ),
    ] {
        if rule_of(direction) && wrong.contains(&key) {
            let dir = direction.name();
            let right = if key.ends_with("Endpoints") {
                peers
            } else {
                entities
            };
            return InvalidSpec(format!(
                "{parent}.{key}: not allowed in an {dir} rule; an {dir} rule names its peers with {right}"
            ));
        }
    }
    InvalidSpec(format!("{parent}: unknown field `{key}`"))
}

/// Selectors say how the node agent recognises a caller of the Workload API.
fn check_selector(s: &str) -> Result<(), String> {
    if let Some(ns) = s.strip_prefix("netns:") {
        if ns.is_empty() || ns.contains('/') || ns == "." || ns == ".." {
            return Err("netns: needs the name of a namespace under /var/run/netns".into());
        }
        return Ok(());
    }
    if let Some(uid) = s.strip_prefix("unix:uid:") {
        uid.parse::<u32>()
            .map_err(|_| "unix:uid: needs a numeric uid".to_string())?;
        return Ok(());
    }
    Err("unknown selector; supported: netns:NAME, unix:uid:N".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::policy::{
        AuthMode, Entity, NAMESPACE_LABEL, Operator, PortProtocol, Protocol, SERVICE_ACCOUNT_LABEL,
    };
    use std::time::Duration;

    fn td() -> TrustDomain {
        spiffe_id::parse_trust_domain("cluster.local").unwrap()
    }

    const GOOD: &str = r#"
apiVersion: keyway.dev/v1alpha1
kind: Workload
metadata: { name: frontend, namespace: default, labels: { app: frontend } }
spec:
  serviceAccount: frontend
  node: node-a
  ips: ["10.244.1.10"]
  selectors: ["netns:frontend", "unix:uid:1000"]
  svidTTL: 1h
---
apiVersion: keyway.dev/v1alpha1
kind: Workload
metadata: { name: api }
spec: { node: node-b }
"#;

    #[test]
    fn parses_the_documented_example() {
        let w = parse_documents(GOOD, &td(), Duration::from_secs(86400))
            .unwrap()
            .workloads;
        assert_eq!(w.len(), 2);
        assert_eq!(w[0].spiffe_id, "spiffe://cluster.local/ns/default/sa/frontend");
        assert_eq!(w[0].svid_ttl_secs, Some(3600));
        assert_eq!(w[1].spiffe_id, "spiffe://cluster.local/ns/default/sa/default");
    }

    #[test]
    fn errors_name_the_document_and_field() {
        let max = Duration::from_secs(86400);
        let bad_ip = GOOD.replace("10.244.1.10", "10.244.1.300");
        assert!(
            parse_documents(&bad_ip, &td(), max)
                .unwrap_err()
                .contains("spec.ips[0]")
        );
        let typo = GOOD.replace("serviceAccount", "serviceAcount");
        assert!(
            parse_documents(&typo, &td(), max)
                .unwrap_err()
                .contains("serviceAcount")
        );
        let bad_sel = GOOD.replace("unix:uid:1000", "pid:1");
        assert!(
            parse_documents(&bad_sel, &td(), max)
                .unwrap_err()
                .contains("selectors[1]")
        );
        let long_ttl = GOOD.replace("svidTTL: 1h", "svidTTL: 30d");
        assert!(
            parse_documents(&long_ttl, &td(), max)
                .unwrap_err()
                .contains("svidTTL")
        );
        let kind = GOOD.replace(
            "kind: Workload\nmetadata: { name: api }",
            "kind: Pod\nmetadata: { name: api }",
        );
        assert!(
            parse_documents(&kind, &td(), max)
                .unwrap_err()
                .contains("document 2")
        );
        let upper = GOOD.replace("serviceAccount: frontend", "serviceAccount: Frontend");
        assert!(
            parse_documents(&upper, &td(), max)
                .unwrap_err()
                .contains("service account")
        );
    }

    #[test]
    fn delete_reads_kind_namespace_and_name_only() {
        // The spec is not validated: a file whose spec no longer applies
        // still deletes what it names.
        let stale = GOOD.replace("svidTTL: 1h", "svidTTL: 30d");
        let refs = parse_refs(&format!("{stale}---{POLICY}")).unwrap();
        let got: Vec<_> = refs.iter().map(|r| (r.kind, r.key())).collect();
        assert_eq!(
            got,
            vec![
                (DocumentKind::Workload, "default/frontend".to_string()),
                (DocumentKind::Workload, "default/api".to_string()),
                (DocumentKind::KeywayNetworkPolicy, "default/api-mtls".to_string()),
            ]
        );
        // A workload and a policy may share a name; one document twice may not.
        let same_name = POLICY.replace("name: api-mtls", "name: frontend");
        assert_eq!(parse_refs(&format!("{GOOD}---{same_name}")).unwrap().len(), 3);
        assert!(
            parse_refs(&format!("{POLICY}---{POLICY}"))
                .unwrap_err()
                .contains("KeywayNetworkPolicy default/api-mtls appears twice")
        );
        // Every document must still be one of the two kinds, named.
        let cases: &[(&str, &str)] = &[
            (
                "kind: Pod\nmetadata: { name: x }",
                "document 1: kind \"Pod\" is not supported",
            ),
            (
                "kind: Workload\nmetadata: { namespace: default }",
                "metadata.name is missing",
            ),
            ("kind: Workload\nmetadata: { name: Bad_Name }", "metadata.name"),
            ("metadata: { name: x }", "kind is missing"),
            ("kind: Workload\nmetadata: [", "not valid YAML"),
        ];
        for (body, want) in cases {
            let yaml = format!("apiVersion: keyway.dev/v1alpha1\n{body}\n");
            let e = parse_refs(&yaml).unwrap_err();
            assert!(e.contains(want), "{body}: {e:?} does not mention {want:?}");
        }
        let other_version = GOOD.replace("keyway.dev/v1alpha1", "v1");
        assert!(parse_refs(&other_version).unwrap_err().contains("apiVersion"));
        assert_eq!(parse_refs("---\n").unwrap_err(), "no documents found");
    }

    const POLICY: &str = r#"
apiVersion: keyway.dev/v1alpha1
kind: KeywayNetworkPolicy
metadata: { name: api-mtls, namespace: default }
spec:
  endpointSelector: { matchLabels: { app: api } }
  ingress:
    - authentication: { mode: required }   # required | disabled
      fromEndpoints:
        - matchLabels: { app: frontend }
      toPorts:
        - ports: [{ port: "8080", protocol: TCP }]
"#;

    fn policy_err(yaml: &str) -> String {
        parse_documents(yaml, &td(), Duration::from_secs(86400)).unwrap_err()
    }

    #[test]
    fn parses_the_documented_policy_alongside_workloads() {
        let docs = parse_documents(&format!("{GOOD}---{POLICY}"), &td(), Duration::from_secs(86400)).unwrap();
        assert_eq!(docs.workloads.len(), 2);
        assert_eq!(docs.policies.len(), 1);
        let p = &docs.policies[0];
        assert_eq!(p.key(), "default/api-mtls");
        assert_eq!(p.spec.endpoint_selector.match_labels["app"], "api");
        assert!(p.spec.egress.is_none());
        let rule = &p.spec.ingress.as_ref().unwrap()[0];
        assert_eq!(rule.authentication, AuthMode::Required);
        assert_eq!(
            rule.endpoints.as_ref().unwrap()[0].match_labels["app"],
            "frontend"
        );
        assert_eq!(rule.ports, Some(vec![PortProtocol::single(8080, Protocol::Tcp)]));
        // A policy alone is a valid apply; the namespace defaults.
        let alone = POLICY.replace(", namespace: default", "");
        let docs = parse_documents(&alone, &td(), Duration::from_secs(86400)).unwrap();
        assert_eq!(docs.policies[0].namespace, "default");
        assert!(docs.workloads.is_empty());
    }

    #[test]
    fn selector_keys_understand_the_k8s_prefix_and_pseudo_labels() {
        let yaml = r#"
apiVersion: keyway.dev/v1alpha1
kind: KeywayNetworkPolicy
metadata: { name: p, namespace: team }
spec:
  endpointSelector:
    matchLabels: { "k8s:app": api }
  ingress: []
  egress:
    - toEndpoints:
        - matchLabels:
            k8s:io.kubernetes.pod.namespace: kube-system
            k8s:io.kubernetes.pod.serviceaccount: coredns
          matchExpressions:
            - { key: "k8s:tier", operator: NotIn, values: [b, a, a] }
            - { key: debug, operator: DoesNotExist }
      toEntities: [world, cluster]
      toPorts:
        - ports: [{ port: 53 }, { protocol: ICMP }, { port: 9000, protocol: SCTP }]
"#;
        let docs = parse_documents(yaml, &td(), Duration::from_secs(86400)).unwrap();
        let spec = &docs.policies[0].spec;
        assert_eq!(spec.endpoint_selector.match_labels["app"], "api");
        assert_eq!(spec.ingress, Some(vec![]));
        let rule = &spec.egress.as_ref().unwrap()[0];
        let sel = &rule.endpoints.as_ref().unwrap()[0];
        assert_eq!(sel.match_labels[NAMESPACE_LABEL], "kube-system");
        assert_eq!(sel.match_labels[SERVICE_ACCOUNT_LABEL], "coredns");
        assert!(sel.constrains_namespace());
        assert_eq!(sel.match_expressions[0].key, "tier");
        assert_eq!(sel.match_expressions[0].values, vec!["a", "b"]);
        assert_eq!(sel.match_expressions[1].operator, Operator::DoesNotExist);
        assert_eq!(rule.entities, Some(vec![Entity::World, Entity::Cluster]));
        let ports = rule.ports.as_ref().unwrap();
        assert_eq!(ports[0], PortProtocol::single(53, Protocol::Any));
        assert_eq!(ports[1], PortProtocol::single(0, Protocol::Icmp));
        assert_eq!(ports[2].protocol, Protocol::Sctp);
    }

    #[test]
    fn policy_errors_name_the_document_the_policy_and_the_field() {
        let two = format!("{GOOD}---{POLICY}");
        let cases: &[(&str, &str, &[&str])] = &[
            (
                "port: \"8080\"",
                "port: \"http\"",
                &["spec.ingress[0].toPorts[0].ports[0].port", "\"http\"", "0-65535"],
            ),
            (
                "port: \"8080\"",
                "port: \"8080\", endPort: 80",
                &["ports[0].endPort: 80 is below port 8080"],
            ),
            ("port: \"8080\"", "port: 70000", &["ports[0].port: 70000 is not"]),
            (
                "protocol: TCP",
                "protocol: HTTP",
                &["ports[0].protocol", "\"HTTP\"", "TCP, UDP"],
            ),
            (
                "mode: required",
                "mode: strict",
                &["authentication.mode", "\"strict\"", "required or disabled"],
            ),
            (
                "fromEndpoints:",
                "fromEndpoint:",
                &["spec.ingress[0]", "unknown field `fromEndpoint`"],
            ),
            (
                "fromEndpoints:",
                "toEndpoints:",
                &["spec.ingress[0].toEndpoints", "fromEndpoints"],
            ),
            (
                "matchLabels: { app: frontend }",
                "matchLabel: { app: frontend }",
                &["fromEndpoints[0]", "matchLabel"],
            ),
            (
                "matchLabels: { app: frontend }",
                "matchExpressions: [{ key: app, operator: Equals, values: [x] }]",
                &[
                    "spec.ingress[0].fromEndpoints[0].matchExpressions[0].operator",
                    "\"Equals\"",
                    "NotIn",
                ],
            ),
            (
                "matchLabels: { app: frontend }",
                "matchExpressions: [{ key: app, operator: In }]",
                &["matchExpressions[0].values", "In needs at least one value"],
            ),
            (
                "matchLabels: { app: frontend }",
                "matchLabels: { \"reserved:host\": \"\" }",
                &["matchLabels", "fromEntities"],
            ),
            (
                "matchLabels: { app: frontend }",
                "matchLabels: { io.cilium.k8s.policy.serviceaccount: web }",
                &[
                    "fromEndpoints[0].matchLabels",
                    "Cilium's spelling",
                    "k8s:io.kubernetes.pod.serviceaccount",
                ],
            ),
            (
                "endpointSelector:",
                "podSelector:",
                &["unknown field `podSelector`"],
            ),
            (
                "- ports: [{ port: \"8080\", protocol: TCP }]",
                "- ports: [{ endPort: 90, protocol: TCP }]",
                &["ports[0].endPort: a range needs a start port"],
            ),
            (
                "- ports: [{ port: \"8080\", protocol: TCP }]",
                "- ports: [{ port: 7, protocol: ICMP }]",
                &["ICMP has no ports"],
            ),
            (
                "      fromEndpoints:",
                "      fromEntities: [internet]\n      fromEndpoints:",
                &["fromEntities[0]", "\"internet\""],
            ),
            ("name: api-mtls", "name: Api_Mtls", &["metadata.name"]),
            (
                "- ports: [{ port: \"8080\", protocol: TCP }]",
                "- ports: [{}]",
                &["ports[0]: names neither a port nor a protocol"],
            ),
            (
                "      fromEndpoints:",
                "      toEntities: [world]\n      fromEndpoints:",
                &[
                    "spec.ingress[0].toEntities: not allowed in an ingress rule",
                    "fromEntities",
                ],
            ),
        ];
        for (from, to, wants) in cases {
            assert!(two.contains(from), "{from}");
            let e = policy_err(&two.replacen(from, to, 1));
            for want in wants
                .iter()
                .chain(&["document 3", "KeywayNetworkPolicy default/"])
            {
                assert!(
                    e.contains(want),
                    "{from} -> {to}: {e:?} does not mention {want:?}"
                );
            }
        }
        let no_selector = POLICY.replace("  endpointSelector: { matchLabels: { app: api } }\n", "");
        assert!(policy_err(&no_selector).contains("spec.endpointSelector is missing"));
        // Its selector commented out: missing too, not "every endpoint".
        let null_selector = POLICY.replace(
            "  endpointSelector: { matchLabels: { app: api } }\n",
            "  endpointSelector:\n  #  matchLabels: { app: api }\n",
        );
        assert!(policy_err(&null_selector).contains("spec.endpointSelector is missing"));
        let twice = format!("{POLICY}---{POLICY}");
        assert!(policy_err(&twice).contains("appears twice"));
    }

    /// The API server prunes what its schema does not know; a document has
    /// no API server, so a field the CRD lacks is refused at any depth (a
    /// misspelt `values` would otherwise leave an `In` with no values, or a
    /// misspelt peer list a rule that allows every peer).
    #[test]
    fn a_field_the_crd_does_not_have_is_refused_at_any_depth_and_type_errors_name_the_field() {
        let cases: &[(&str, &str)] = &[
            (
                "matchLabels: { app: frontend }",
                "matchExpressions: [{ key: app, operator: In, value: [x] }]",
            ),
            ("protocol: TCP", "protocol: TCP, hostPort: 1"),
            ("mode: required", "mode: required, level: 2"),
        ];
        let want = [
            "spec.ingress[0].fromEndpoints[0].matchExpressions[0]: unknown field `value`",
            "spec.ingress[0].toPorts[0].ports[0]: unknown field `hostPort`",
            "spec.ingress[0].authentication: unknown field `level`",
        ];
        for ((from, to), want) in cases.iter().zip(want) {
            let e = policy_err(&POLICY.replacen(from, to, 1));
            assert!(e.contains(want), "{to}: {e:?} does not mention {want:?}");
        }
        let e = policy_err(&POLICY.replacen("port: \"8080\"", "port: [8080]", 1));
        assert!(
            e.contains("spec.ingress[0].toPorts[0].ports[0].port: invalid type: sequence"),
            "{e:?}"
        );
        let e = policy_err(&POLICY.replacen("{ app: frontend }", "{ app: [frontend] }", 1));
        assert!(
            e.contains("spec.ingress[0].fromEndpoints[0].matchLabels.app: invalid type"),
            "{e:?}"
        );
    }
}
