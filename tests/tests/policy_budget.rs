//! One tenant's policy must not exhaust the control plane. The audit's
//! policy (400 ports to `fromEntities: [cluster]`, selecting 100 workloads)
//! compiled subject x peer x port x protocol and took 1.3 GB from a 4.6 KB
//! document. Against the real `control-plane` binary: that policy compiles
//! compactly (one entry per 256-port block, one any-peer entry for the
//! cluster), the variant that names every identity one by one is refused by
//! `apply` with the budget in the message, nothing of it is stored, and the
//! process's RSS stays flat throughout.

use std::fmt::Write as _;
use std::path::Path;

use keyway_tests::Binary;

/// 100 workloads `w0..w99` labelled `app: api`, in namespace `tenant`.
fn workloads() -> String {
    let mut out = String::new();
    for i in 0..100 {
        let _ = write!(
            out,
            "---\napiVersion: keyway.dev/v1alpha1\nkind: Workload\n\
             metadata: {{ name: w{i}, namespace: tenant, labels: {{ app: api }} }}\n\
             spec:\n  serviceAccount: w{i}\n  node: node-a\n  ips: [\"10.250.{}.{}\"]\n",
            i / 200,
            i % 200 + 1
        );
    }
    out
}

/// The policy: 400 TCP ports spread over the port space (every 160th, so
/// they touch 251 blocks), in four `toPorts` items of 100 (the CRD allows
/// 128 per item), from `peers`.
fn policy(name: &str, peers: &str) -> String {
    let mut items = String::new();
    for chunk in 0..4 {
        items.push_str("        - ports: [");
        let ports: Vec<String> = (0..100)
            .map(|i| format!("{{ port: \"{}\", protocol: TCP }}", 100 + (chunk * 100 + i) * 160))
            .collect();
        items.push_str(&ports.join(", "));
        items.push_str("]\n");
    }
    format!(
        "apiVersion: keyway.dev/v1alpha1\nkind: KeywayNetworkPolicy\n\
         metadata: {{ name: {name}, namespace: tenant }}\n\
         spec:\n  endpointSelector: {{ matchLabels: {{ app: api }} }}\n  ingress:\n    - {peers}\n      toPorts:\n{items}"
    )
}

fn apply(cp: &Binary, dir: &Path, name: &str, yaml: &str) -> std::process::Output {
    let f = dir.join(name);
    std::fs::write(&f, yaml).unwrap();
    cp.cli(&["apply", "-f", f.to_str().unwrap()])
}

#[test]
fn the_400_port_cluster_policy_compiles_compactly_and_the_per_identity_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cp = Binary::spawn(&dir.path().join("cp"), &[]);
    let out = apply(&cp, dir.path(), "workloads.yaml", &workloads());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let pid = cp.child.id();
    let before = keyway_tests::rss_kib(pid);

    // fromEntities: [cluster] -- compiled: 100 subjects x 251 blocks.
    let cluster = policy("cluster-400", "fromEntities: [cluster]");
    eprintln!("policy document: {} bytes", cluster.len());
    let out = apply(&cp, dir.path(), "cluster.yaml", &cluster);
    assert!(
        out.status.success(),
        "the cluster policy compiles: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after_cluster = keyway_tests::rss_kib(pid);

    // Every identity named one by one: 100 x 100 x 251 entries, refused.
    let named = policy(
        "everyone-400",
        "fromEndpoints: [{ matchExpressions: [{ key: io.kubernetes.pod.namespace, operator: Exists }] }]",
    );
    let out = apply(&cp, dir.path(), "named.yaml", &named);
    assert!(!out.status.success(), "the per-identity policy must be refused");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tenant/everyone-400") && err.contains("per-policy budget of 65536"),
        "the refusal names the policy and the budget: {err}"
    );
    let stored = cp.ok(&["identity", "list", "-o", "json"]);
    assert_eq!(stored.lines().count(), 100, "the workloads are still there");
    let after_refusal = keyway_tests::rss_kib(pid);
    eprintln!(
        "control-plane RSS: {} MiB with 100 workloads, {} MiB after the cluster policy, {} MiB after the refused one",
        before / 1024,
        after_cluster / 1024,
        after_refusal / 1024
    );
    assert!(
        after_refusal.saturating_sub(before) < 64 * 1024,
        "RSS grew {} MiB",
        after_refusal.saturating_sub(before) / 1024
    );
}
