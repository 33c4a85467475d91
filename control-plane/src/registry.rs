//! Standalone-mode documents: `Workload` (DESIGN.md section 9) parsed and
//! validated into store records. Kubernetes mode produces the same records
//! from Pods.

use std::collections::BTreeMap;
use std::net::IpAddr;

use keyway_identity::{TrustDomain, spiffe_id};
use serde::Deserialize;

use crate::store::WorkloadRecord;

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

/// Parses every document of a multi-document YAML file. Nothing is returned
/// unless every document is valid: an apply is all or nothing.
pub fn parse_documents(
    yaml: &str,
    td: &TrustDomain,
    max_ttl: std::time::Duration,
) -> Result<Vec<WorkloadRecord>, String> {
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
        match doc.kind.as_deref() {
            Some("Workload") => out.push(workload(n, doc, td, max_ttl)?),
            Some(other) => {
                return Err(format!(
                    "document {n}: kind {other:?} is not supported by this control plane (supported: Workload)"
                ));
            }
            None => return Err(format!("document {n}: kind is missing")),
        }
    }
    if out.is_empty() {
        return Err("no documents found".into());
    }
    let mut seen = std::collections::BTreeSet::new();
    for w in &out {
        if !seen.insert(w.key()) {
            return Err(format!("workload {} appears twice in the same apply", w.key()));
        }
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
        let w = parse_documents(GOOD, &td(), Duration::from_secs(86400)).unwrap();
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
}
