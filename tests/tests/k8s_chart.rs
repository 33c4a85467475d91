//! The Helm chart in charts/keyway against a real kube-apiserver. The chart
//! is rendered by `keyway_tests::helm` (Helm's template language, for what
//! the chart uses; the `helm` binary is not installable here), its CRD is
//! installed for real, and every other object is applied with a server-side
//! apply dry run: the apiserver validates and defaults exactly what `helm
//! install` would send. What it returns is compared with what was sent,
//! because an apiserver drops a misspelt or unknown field silently instead
//! of refusing it; then the settings a cluster operator relies on (the
//! agent's capabilities and host namespaces, the RBAC rules, the flags) are
//! checked one by one. Each test renders into its own namespace.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use keyway_tests::helm::{self, Rendered};
use keyway_tests::kube::cluster;
use serde_json::{Value as Json, json};

const MANAGER: &str = "keyway-chart-test";

fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/keyway")
}

fn render(release: &str, namespace: &str, overrides: &str) -> Result<Vec<Rendered>, String> {
    let overrides: serde_yaml::Value = serde_yaml::from_str(overrides).expect("overrides are YAML");
    helm::render(&chart_dir(), release, namespace, &overrides)
}

/// One object of the chart: as rendered, and as the apiserver returned it.
struct Applied {
    sent: Json,
    got: Json,
}

impl Applied {
    fn kind(&self) -> &str {
        self.sent["kind"].as_str().unwrap_or_default()
    }

    fn name(&self) -> &str {
        self.sent["metadata"]["name"].as_str().unwrap_or_default()
    }
}

/// Installs the chart's CRDs (server-side apply, for real: idempotent, and
/// other tests may have installed them already), then applies every other
/// object as a dry run.
async fn apply_chart(rendered: &[Rendered], namespace: &str) -> Vec<Applied> {
    let client = cluster().admin().await;
    let mut out = Vec::new();
    let (crds, templates): (Vec<Rendered>, Vec<Rendered>) = rendered
        .iter()
        .cloned()
        .partition(|r| r.template.contains("/crds/"));
    assert!(!crds.is_empty(), "the chart ships its CRD in crds/");
    for (dry_run, files) in [(false, crds), (true, templates)] {
        for obj in helm::objects(&files) {
            let sent = serde_json::to_value(&obj).expect("a rendered object is JSON");
            let got = keyway_tests::kube::apply_object(&client, &sent, namespace, dry_run, MANAGER).await;
            out.push(Applied { sent, got });
        }
    }
    out
}

/// Everything sent is in what came back, unchanged (the server may add).
fn assert_kept(sent: &Json, got: &Json, path: &str) {
    match (sent, got) {
        (Json::Object(s), Json::Object(g)) => {
            for (k, v) in s {
                let Some(gv) = g.get(k) else {
                    panic!("{path}.{k} was dropped by the apiserver: a misspelt or unknown field");
                };
                assert_kept(v, gv, &format!("{path}.{k}"));
            }
        }
        (Json::Array(s), Json::Array(g)) => {
            assert_eq!(
                s.len(),
                g.len(),
                "{path}: the apiserver changed the list\nsent {sent}\ngot {got}"
            );
            for (i, (a, b)) in s.iter().zip(g).enumerate() {
                assert_kept(a, b, &format!("{path}[{i}]"));
            }
        }
        (Json::Number(a), Json::Number(b)) => assert_eq!(a.as_f64(), b.as_f64(), "{path}"),
        _ => assert_eq!(sent, got, "{path}: the apiserver changed the value"),
    }
}

fn find<'a>(objs: &'a [Applied], kind: &str, name: &str) -> &'a Json {
    &objs
        .iter()
        .find(|o| o.kind() == kind && o.name() == name)
        .unwrap_or_else(|| panic!("the chart has no {kind} {name}"))
        .got
}

/// The value after `flag` in a container's args.
fn flag<'a>(container: &'a Json, flag: &str) -> &'a str {
    let args = container["args"].as_array().expect("args");
    let i = args
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("no {flag} in {args:?}"));
    args.get(i + 1)
        .and_then(Json::as_str)
        .unwrap_or_else(|| panic!("{flag} has no value in {args:?}"))
}

fn has_arg(container: &Json, arg: &str) -> bool {
    container["args"]
        .as_array()
        .expect("args")
        .iter()
        .any(|a| a == arg)
}

fn volume<'a>(pod: &'a Json, name: &str) -> &'a Json {
    pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no volume {name}"))
}

fn mount<'a>(container: &'a Json, name: &str) -> &'a Json {
    container["volumeMounts"]
        .as_array()
        .expect("volumeMounts")
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no volume mount {name}"))
}

/// Every label of `selector` is on `labels`.
/// The kubelet probes `container` over HTTP on its `metrics` port, and the
/// pod template carries the Prometheus scrape annotations for `port`.
fn assert_probed_and_scraped(container: &Json, template: &Json, port: &str) {
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        assert_eq!(container[probe]["httpGet"]["path"], path, "{probe}");
        assert_eq!(container[probe]["httpGet"]["port"], "metrics", "{probe}");
    }
    assert_eq!(
        template["metadata"]["annotations"],
        json!({"prometheus.io/scrape": "true", "prometheus.io/port": port, "prometheus.io/path": "/metrics"})
    );
}

fn selects(selector: &Json, labels: &Json) -> bool {
    selector
        .as_object()
        .expect("selector")
        .iter()
        .all(|(k, v)| labels.get(k) == Some(v))
}

#[tokio::test]
async fn default_install_is_accepted_and_keeps_its_security_settings() {
    let ns = cluster().namespace("chart").await;
    let rendered = render("keyway", &ns, "{}").unwrap_or_else(|e| panic!("render: {e}"));
    let objs = apply_chart(&rendered, &ns).await;

    let installed: BTreeSet<(String, String)> = objs
        .iter()
        .map(|o| (o.kind().to_string(), o.name().to_string()))
        .collect();
    let expected: BTreeSet<(String, String)> = [
        ("CustomResourceDefinition", "keywaynetworkpolicies.keyway.dev"),
        ("ServiceAccount", "keyway-control-plane"),
        ("ClusterRole", "keyway-control-plane"),
        ("ClusterRoleBinding", "keyway-control-plane"),
        ("Role", "keyway-control-plane"),
        ("RoleBinding", "keyway-control-plane"),
        ("Service", "keyway-control-plane"),
        ("Deployment", "keyway-control-plane"),
        ("ServiceAccount", "keyway-node-agent"),
        ("DaemonSet", "keyway-node-agent"),
    ]
    .iter()
    .map(|(k, n)| (k.to_string(), n.to_string()))
    .collect();
    assert_eq!(installed, expected);
    assert_eq!(objs.len(), expected.len(), "one object per kind and name");

    for o in objs.iter().filter(|o| o.kind() != "CustomResourceDefinition") {
        assert_kept(&o.sent, &o.got, &format!("{} {}", o.kind(), o.name()));
        let labels = &o.got["metadata"]["labels"];
        assert_eq!(
            labels["app.kubernetes.io/managed-by"],
            "Helm",
            "{} {}",
            o.kind(),
            o.name()
        );
        assert_eq!(labels["app.kubernetes.io/instance"], "keyway");
        assert_eq!(labels["app.kubernetes.io/version"], "0.1.0");
    }
    let crd = find(
        &objs,
        "CustomResourceDefinition",
        "keywaynetworkpolicies.keyway.dev",
    );
    assert_eq!(crd["spec"]["names"]["kind"], "KeywayNetworkPolicy");

    // The node agent: host namespaces, exactly three capabilities, no API token.
    let ds = find(&objs, "DaemonSet", "keyway-node-agent");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["hostPID"], true);
    assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet");
    assert_eq!(pod["automountServiceAccountToken"], false);
    assert_eq!(pod["serviceAccountName"], "keyway-node-agent");
    assert_eq!(pod["tolerations"], json!([{"operator": "Exists"}]));
    assert_eq!(ds["spec"]["updateStrategy"]["type"], "RollingUpdate");
    assert_eq!(ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"], 1);
    let agent = &pod["containers"][0];
    let sc = &agent["securityContext"];
    assert_eq!(sc["capabilities"]["add"], json!(["BPF", "NET_ADMIN", "PERFMON"]));
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["runAsUser"], 0);
    assert_eq!(agent["command"], json!(["node-agent"]));
    assert_eq!(agent["args"][0], "run");
    // No cluster DNS needed: the kubelet expands the control-plane Service's
    // variables, whose names come from the Service's name and port name.
    assert_eq!(
        flag(agent, "--server"),
        "$(KEYWAY_CONTROL_PLANE_SERVICE_HOST):$(KEYWAY_CONTROL_PLANE_SERVICE_PORT_GRPC_AGENT)"
    );
    let auth_address = agent["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "KEYWAY_AUTH_ADDRESS")
        .expect("KEYWAY_AUTH_ADDRESS");
    assert_eq!(
        auth_address["valueFrom"]["fieldRef"]["fieldPath"], "status.hostIP",
        "mutual auth on the Node's own address"
    );
    let svc = find(&objs, "Service", "keyway-control-plane");
    assert_eq!(svc["spec"]["ports"][0]["name"], "grpc-agent");
    assert_eq!(svc["spec"]["ports"][0]["port"], 8081);
    assert_eq!(flag(agent, "--trust-bundle"), "/run/keyway/bundle/bundle.pem");
    assert_eq!(flag(agent, "--trust-domain"), "cluster.local");
    assert_eq!(flag(agent, "--node-name"), "$(NODE_NAME)");
    assert_eq!(flag(agent, "--k8s-token-file"), "/var/run/secrets/keyway/token");
    assert_eq!(flag(agent, "--data-dir"), "/var/lib/keyway/agent");
    assert_eq!(flag(agent, "--socket"), "/run/keyway/sockets/agent.sock");
    // The admin socket is not in the directory workloads mount.
    assert_eq!(
        flag(agent, "--admin-socket"),
        "/run/keyway/admin/agent-admin.sock"
    );
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    assert_eq!(flag(agent, "--auth-port"), "4250");
    assert!(has_arg(agent, "--datapath"));
    assert_eq!(
        agent["env"][0]["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
    assert_eq!(agent["ports"][0]["containerPort"], 4250);
    // Metrics and health on every address of the node (the kubelet probes
    // the node's IP), probed over HTTP, announced to Prometheus.
    assert_eq!(flag(agent, "--metrics-address"), "0.0.0.0:9091");
    // On the host network the apiserver makes each container port a host port.
    assert_eq!(
        agent["ports"][1],
        json!({"name": "metrics", "containerPort": 9091, "hostPort": 9091, "protocol": "TCP"})
    );
    assert_probed_and_scraped(agent, &ds["spec"]["template"], "9091");
    // The pins survive restarts only on the host's own bpffs, which must exist.
    assert_eq!(
        volume(pod, "bpffs")["hostPath"],
        json!({"path": "/sys/fs/bpf", "type": "Directory"})
    );
    assert_eq!(mount(agent, "bpffs")["mountPath"], "/sys/fs/bpf");
    assert_eq!(
        volume(pod, "sockets")["hostPath"],
        json!({"path": "/run/keyway/sockets", "type": "DirectoryOrCreate"})
    );
    assert_eq!(mount(agent, "sockets")["mountPath"], "/run/keyway/sockets");
    assert_eq!(
        volume(pod, "admin")["hostPath"],
        json!({"path": "/run/keyway/admin", "type": "DirectoryOrCreate"})
    );
    assert_eq!(mount(agent, "admin")["mountPath"], "/run/keyway/admin");
    assert_eq!(
        volume(pod, "data")["hostPath"],
        json!({"path": "/var/lib/keyway/agent", "type": "DirectoryOrCreate"})
    );
    assert_eq!(volume(pod, "bundle")["configMap"]["name"], "keyway-bundle");
    assert_eq!(mount(agent, "bundle")["mountPath"], "/run/keyway/bundle");
    assert_eq!(mount(agent, "bundle")["readOnly"], true);
    assert_eq!(
        volume(pod, "token")["projected"]["sources"][0]["serviceAccountToken"],
        json!({"audience": "keyway", "expirationSeconds": 600, "path": "token"})
    );
    assert_eq!(mount(agent, "token")["mountPath"], "/var/run/secrets/keyway");
    assert!(selects(
        &ds["spec"]["selector"]["matchLabels"],
        &ds["spec"]["template"]["metadata"]["labels"]
    ));

    let agent_sa = find(&objs, "ServiceAccount", "keyway-node-agent");
    assert_eq!(agent_sa["automountServiceAccountToken"], false);

    // The control plane: hardened pod, Kubernetes store, flags from values.
    let deploy = find(&objs, "Deployment", "keyway-control-plane");
    assert_eq!(deploy["spec"]["replicas"], 2);
    let pod = &deploy["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "keyway-control-plane");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault");
    let anti = &pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0];
    assert_eq!(anti["podAffinityTerm"]["topologyKey"], "kubernetes.io/hostname");
    assert!(selects(
        &anti["podAffinityTerm"]["labelSelector"]["matchLabels"],
        &deploy["spec"]["template"]["metadata"]["labels"]
    ));
    let cp = &pod["containers"][0];
    assert_eq!(cp["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(cp["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(cp["securityContext"]["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(cp["command"], json!(["control-plane"]));
    assert_eq!(cp["args"][0], "serve");
    assert!(has_arg(cp, "--kubernetes"));
    assert_eq!(flag(cp, "--store"), "kubernetes");
    assert_eq!(flag(cp, "--namespace"), "$(POD_NAMESPACE)");
    assert_eq!(flag(cp, "--holder-identity"), "$(POD_NAME)");
    assert_eq!(flag(cp, "--trust-domain"), "cluster.local");
    assert_eq!(flag(cp, "--svid-ttl"), "1h");
    assert_eq!(flag(cp, "--node-svid-ttl"), "24h");
    assert_eq!(flag(cp, "--jwt-ttl"), "5m");
    assert_eq!(flag(cp, "--ca-ttl"), "365d");
    assert_eq!(flag(cp, "--listen"), "0.0.0.0:8081");
    assert_eq!(flag(cp, "--data-dir"), "/var/lib/keyway");
    assert_eq!(flag(cp, "--admin-socket"), "/var/run/keyway/admin.sock");
    assert_eq!(
        flag(cp, "--agent-service-account"),
        format!("{ns}/keyway-node-agent")
    );
    assert_eq!(flag(cp, "--lease-name"), "keyway-control-plane");
    let env = cp["env"].as_array().expect("env");
    let field_of = |name: &str| {
        env.iter()
            .find(|e| e["name"] == name)
            .map(|e| e["valueFrom"]["fieldRef"]["fieldPath"].clone())
    };
    assert_eq!(field_of("POD_NAME"), Some(json!("metadata.name")));
    assert_eq!(field_of("POD_NAMESPACE"), Some(json!("metadata.namespace")));
    assert_eq!(flag(cp, "--metrics-address"), "0.0.0.0:9090");
    assert_eq!(
        cp["ports"][1],
        json!({"name": "metrics", "containerPort": 9090, "protocol": "TCP"})
    );
    assert_probed_and_scraped(cp, &deploy["spec"]["template"], "9090");
    assert_eq!(mount(cp, "data")["mountPath"], "/var/lib/keyway");
    assert!(volume(pod, "data").get("emptyDir").is_some());

    // The agents reach it through the Service the --server flag names.
    let svc = find(&objs, "Service", "keyway-control-plane");
    assert_eq!(svc["spec"]["type"], "ClusterIP");
    assert_eq!(svc["spec"]["ports"][0]["name"], "grpc-agent");
    assert_eq!(svc["spec"]["ports"][0]["port"], 8081);
    assert_eq!(svc["spec"]["ports"][1]["name"], "metrics");
    assert_eq!(svc["spec"]["ports"][1]["port"], 9090);
    assert_eq!(svc["spec"]["ports"][1]["targetPort"], "metrics");
    assert!(
        selects(
            &svc["spec"]["selector"],
            &deploy["spec"]["template"]["metadata"]["labels"]
        ),
        "the Service selects the control-plane pods"
    );
    assert!(
        !selects(
            &svc["spec"]["selector"],
            &ds["spec"]["template"]["metadata"]["labels"]
        ),
        "the Service does not select the agents"
    );

    // RBAC: exactly these rules, bound to the control plane only.
    let cluster_role = find(&objs, "ClusterRole", "keyway-control-plane");
    assert_eq!(
        cluster_role["rules"],
        json!([
            {"apiGroups": [""], "resources": ["pods", "serviceaccounts", "namespaces", "nodes"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["keyway.dev"], "resources": ["keywaynetworkpolicies"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["keyway.dev"], "resources": ["keywaynetworkpolicies/status"], "verbs": ["patch", "update"]},
            {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
        ])
    );
    let role = find(&objs, "Role", "keyway-control-plane");
    assert_eq!(
        role["rules"],
        json!([
            {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"]},
            {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
            {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["keyway-ca"], "verbs": ["get", "list", "watch", "update"]},
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": ["keyway-control-plane"], "verbs": ["get", "update"]},
        ])
    );
    let control_plane_sa =
        json!([{"kind": "ServiceAccount", "name": "keyway-control-plane", "namespace": ns}]);
    for (binding, role_kind) in [("ClusterRoleBinding", "ClusterRole"), ("RoleBinding", "Role")] {
        let b = find(&objs, binding, "keyway-control-plane");
        assert_eq!(b["subjects"], control_plane_sa, "{binding}");
        assert_eq!(
            b["roleRef"],
            json!({"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind, "name": "keyway-control-plane"})
        );
    }
}

#[tokio::test]
async fn overrides_single_sled_replica_custom_trust_domain_and_scheduling_values() {
    let ns = cluster().namespace("chart-overrides").await;
    let overrides = r#"
controlPlane:
  replicas: 1
  podLabels: {team: security}
  nodeSelector: {kubernetes.io/os: linux}
  resources: {requests: {cpu: 250m}}
  metricsPort: 9400
store: sled
trustDomain: prod.example.com
svidTTL: 30m
imagePullSecrets: [{name: regcred}]
image: {repository: registry.example.com/keyway, tag: "1.2.3"}
metrics: {scrapeAnnotations: false}
agent:
  server: kw-control-plane.{ns}.svc:8081
  authPort: 4300
  metricsPort: 9500
  tolerations: [{key: dedicated, operator: Equal, value: edge, effect: NoSchedule}]
  podAnnotations: {example.com/scrape: "true"}
"#
    .replace("{ns}", &ns);
    let rendered = render("kw", &ns, &overrides).unwrap_or_else(|e| panic!("render: {e}"));
    let objs = apply_chart(&rendered, &ns).await;
    for o in objs.iter().filter(|o| o.kind() != "CustomResourceDefinition") {
        assert_kept(&o.sent, &o.got, &format!("{} {}", o.kind(), o.name()));
    }

    let deploy = find(&objs, "Deployment", "kw-control-plane");
    assert_eq!(deploy["spec"]["replicas"], 1);
    let pod = &deploy["spec"]["template"]["spec"];
    let cp = &pod["containers"][0];
    assert_eq!(flag(cp, "--store"), "sled");
    assert_eq!(flag(cp, "--trust-domain"), "prod.example.com");
    assert_eq!(flag(cp, "--svid-ttl"), "30m");
    assert_eq!(flag(cp, "--agent-service-account"), format!("{ns}/kw-node-agent"));
    assert_eq!(cp["image"], "registry.example.com/keyway:1.2.3");
    assert_eq!(flag(cp, "--metrics-address"), "0.0.0.0:9400");
    assert_eq!(cp["ports"][1]["containerPort"], 9400);
    assert!(
        deploy["spec"]["template"]["metadata"]
            .get("annotations")
            .is_none(),
        "no scrape annotations and no pod annotations: no annotations"
    );
    let svc = find(&objs, "Service", "kw-control-plane");
    assert_eq!(svc["spec"]["ports"][1]["port"], 9400);
    // Maps merge with the defaults (as `helm install -f` does): only the cpu request changed.
    assert_eq!(
        cp["resources"],
        json!({"requests": {"cpu": "250m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}})
    );
    assert_eq!(pod["imagePullSecrets"], json!([{"name": "regcred"}]));
    assert_eq!(pod["nodeSelector"], json!({"kubernetes.io/os": "linux"}));
    assert_eq!(
        deploy["spec"]["template"]["metadata"]["labels"]["team"],
        "security"
    );
    assert!(
        volume(pod, "data").get("emptyDir").is_some(),
        "sled data lives on an emptyDir"
    );

    let ds = find(&objs, "DaemonSet", "kw-node-agent");
    let pod = &ds["spec"]["template"]["spec"];
    let agent = &pod["containers"][0];
    assert_eq!(flag(agent, "--trust-domain"), "prod.example.com");
    assert_eq!(flag(agent, "--server"), format!("kw-control-plane.{ns}.svc:8081"));
    assert_eq!(flag(agent, "--auth-port"), "4300");
    assert_eq!(agent["ports"][0]["containerPort"], 4300);
    assert_eq!(
        pod["tolerations"],
        json!([{"key": "dedicated", "operator": "Equal", "value": "edge", "effect": "NoSchedule"}])
    );
    assert_eq!(flag(agent, "--metrics-address"), "0.0.0.0:9500");
    assert_eq!(agent["ports"][1]["containerPort"], 9500);
    assert_eq!(
        ds["spec"]["template"]["metadata"]["annotations"],
        json!({"example.com/scrape": "true"}),
        "the pod annotations, without the scrape annotations turned off"
    );
    assert_eq!(pod["serviceAccountName"], "kw-node-agent");
}

#[test]
fn several_replicas_with_the_sled_store_are_refused() {
    let e = render("keyway", "keyway-system", "store: sled").expect_err("2 replicas on sled must not render");
    assert!(
        e.contains("controlPlane.replicas=2") && e.contains("store=sled") && e.contains("store=kubernetes"),
        "the error names the values and the way out: {e}"
    );
    assert!(e.starts_with("execution error at (keyway/templates/"), "{e}");

    let e = render("keyway", "keyway-system", "store: etcd").expect_err("an unknown store must not render");
    assert!(
        e.contains("store=etcd") && e.contains("kubernetes or sled"),
        "{e}"
    );

    let e = render("keyway", "keyway-system", "trustDomain: ''").expect_err("a trust domain is required");
    assert!(e.contains("trustDomain is required"), "{e}");

    // One replica on sled is fine, and the notes warn about it.
    render(
        "keyway",
        "keyway-system",
        "{store: sled, controlPlane: {replicas: 1}}",
    )
    .expect("one sled replica");
}

#[test]
fn the_chart_crd_is_the_one_generated_from_the_rust_types() {
    let path = chart_dir().join("crds/keywaynetworkpolicies.yaml");
    let committed = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        committed == control_plane::crd::crd_yaml(),
        "{} differs from the KeywayNetworkPolicy Rust types; regenerate it with \
         `cargo build -p control-plane && ./target/debug/control-plane crd > charts/keyway/crds/keywaynetworkpolicies.yaml`",
        path.display()
    );
}

#[test]
fn rendered_manifests_split_into_objects_helm_would_send() {
    let rendered = render("keyway", "keyway-system", "{}").unwrap_or_else(|e| panic!("render: {e}"));
    assert_eq!(
        rendered[0].template, "keyway/crds/keywaynetworkpolicies.yaml",
        "CRDs come first"
    );
    assert!(
        rendered
            .iter()
            .all(|r| !r.template.ends_with("NOTES.txt") && !r.template.contains("/_")),
        "no notes, no partials"
    );
    let objects = helm::objects(&rendered);
    assert_eq!(objects.len(), 10);
    for o in &objects {
        assert!(
            o["apiVersion"].is_string() && o["kind"].is_string() && o["metadata"]["name"].is_string(),
            "{o:?}"
        );
    }
}

#[test]
fn the_default_image_is_the_one_make_image_builds() {
    // `make image` (scripts/image.sh) names its image
    // docker.io/library/keyway:<workspace version>, which is what the chart's
    // `keyway:<appVersion>` means to containerd and the kubelet.
    let version = env!("CARGO_PKG_VERSION");
    let rendered = render("keyway", "keyway-system", "{}").unwrap_or_else(|e| panic!("render: {e}"));
    let mut seen = 0;
    for object in helm::objects(&rendered) {
        let object: Json = serde_json::to_value(object).unwrap();
        let pod = &object["spec"]["template"]["spec"];
        for c in pod["containers"].as_array().into_iter().flatten() {
            assert_eq!(
                c["image"],
                format!("keyway:{version}"),
                "{}",
                object["metadata"]["name"]
            );
            seen += 1;
        }
    }
    assert_eq!(seen, 2, "the control plane's and the agent's containers");
    let script = std::fs::read_to_string(chart_dir().join("../../scripts/image.sh")).unwrap();
    assert!(script.contains("NAME=\"docker.io/library/keyway:$VERSION\""));
    let chart = std::fs::read_to_string(chart_dir().join("Chart.yaml")).unwrap();
    assert!(
        chart.contains(&format!("appVersion: \"{version}\"")),
        "Chart.yaml's appVersion is the workspace version ({version}), the tag `make image` gives"
    );
}
