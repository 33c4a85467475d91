//! The `cluster` tier: Keyway installed from its own chart on a real one-node
//! Kubernetes (scripts/local-cluster.sh: kube-apiserver, controller-manager,
//! scheduler, kube-proxy, kubelet, containerd, runc, the ptp CNI), with the
//! image `make image` builds. Everything is asserted the way an operator
//! would see it: through kubectl, the pods themselves, the processes the
//! kubelet started, and packets between pods.
//!
//! Run by `make cluster-tier` through scripts/with-local-cluster.sh, which
//! brings the cluster up, exports KUBECONFIG, KEYWAY_KUBECTL and
//! KEYWAY_CLUSTER_DIR, and takes it down afterwards, also on failure. Without
//! those variables this test fails: the tier never passes by skipping.
//!
//! One test, in steps, because the steps share one cluster and some of them
//! (a leader failover, an agent rollout) would disturb a step running beside
//! them. Each step prints what it measured.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::Engine;
use keyway_tests::{http, wait_until};
use serde_json::Value;

const SYSTEM_NS: &str = "keyway-system";
const TRUST_DOMAIN: &str = "cluster.local";
const ADMIN_SOCKET: &str = "/run/keyway/admin/agent-admin.sock";
const WORKLOAD_IMAGE: &str = "keyway.local/workload:1";
const CP_METRICS_PORT: u16 = 9090;
/// The node the workloads run on (and the only one, unless the cluster has a
/// second: `KEYWAY_CLUSTER_NODES=2`).
const NODE_1: &str = "keyway-node-1";
const NODE_2: &str = "keyway-node-2";

/// How many nodes the cluster was brought up with.
fn nodes() -> usize {
    std::env::var("KEYWAY_CLUSTER_NODES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1)
}

/// kubectl against the local cluster, and its containerd for what only the
/// node sees (the processes the kubelet started).
struct Kube {
    kubectl: PathBuf,
    kubeconfig: PathBuf,
    cluster_dir: PathBuf,
}

fn env_path(name: &str) -> PathBuf {
    PathBuf::from(std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: the cluster tier needs the local cluster. Run `make cluster-tier`, or \
             `scripts/with-local-cluster.sh cargo test -p keyway-tests --test cluster`"
        )
    }))
}

impl Kube {
    fn from_env() -> Kube {
        Kube {
            kubectl: env_path("KEYWAY_KUBECTL"),
            kubeconfig: env_path("KUBECONFIG"),
            cluster_dir: env_path("KEYWAY_CLUSTER_DIR"),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.kubectl);
        c.arg("--kubeconfig").arg(&self.kubeconfig).args(args);
        c
    }

    /// stdout on success, stderr (and stdout) on failure.
    fn run_with_stdin(&self, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
        let mut cmd = self.command(args);
        cmd.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", self.kubectl.display()));
        if let Some(input) = stdin {
            let mut w = child.stdin.take().expect("stdin");
            w.write_all(input.as_bytes()).expect("write kubectl stdin");
        }
        let out = child.wait_with_output().expect("kubectl output");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(stdout)
        } else {
            Err(format!(
                "kubectl {} ({}): {}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr),
                stdout
            ))
        }
    }

    fn run(&self, args: &[&str]) -> Result<String, String> {
        self.run_with_stdin(args, None)
    }

    fn must(&self, args: &[&str]) -> String {
        self.run(args).unwrap_or_else(|e| panic!("{e}"))
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        serde_json::from_str(&self.must(&a)).expect("kubectl JSON")
    }

    fn apply(&self, yaml: &str) {
        self.run_with_stdin(&["apply", "-f", "-"], Some(yaml))
            .unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    }

    fn exec(&self, ns: &str, pod: &str, cmd: &[&str]) -> Result<String, String> {
        let mut args = vec!["exec", "-n", ns, pod, "--"];
        args.extend_from_slice(cmd);
        self.run(&args)
    }

    fn exec_stdin(&self, ns: &str, pod: &str, cmd: &[&str], stdin: &str) -> Result<String, String> {
        let mut args = vec!["exec", "-i", "-n", ns, pod, "--"];
        args.extend_from_slice(cmd);
        self.run_with_stdin(&args, Some(stdin))
    }

    fn pods(&self, ns: &str, selector: &str) -> Vec<Value> {
        let v = self.json(&["get", "pods", "-n", ns, "-l", selector]);
        v["items"].as_array().cloned().unwrap_or_default()
    }

    fn pod(&self, ns: &str, name: &str) -> Value {
        self.json(&["get", "pod", "-n", ns, name])
    }

    /// The host pid of the (first) container of `pod`, from containerd.
    fn container_pid(&self, pod: &Value) -> u32 {
        let id = pod["status"]["containerStatuses"][0]["containerID"]
            .as_str()
            .and_then(|s| s.strip_prefix("containerd://"))
            .unwrap_or_else(|| panic!("no containerd container ID in {}", pod["status"]))
            .to_owned();
        // Each node's own containerd (the second node's under node2/); the
        // pids are the host's either way (nodes share the pid namespace).
        let node_dir = if pod["spec"]["nodeName"] == NODE_2 {
            self.cluster_dir.join("node2")
        } else {
            self.cluster_dir.clone()
        };
        let sock = node_dir.join("containerd/containerd.sock");
        let out = Command::new("ctr")
            .arg("--address")
            .arg(&sock)
            .args(["-n", "k8s.io", "tasks", "ls"])
            .output()
            .expect("ctr tasks ls");
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .find_map(|l| {
                let mut f = l.split_whitespace();
                (f.next() == Some(id.as_str())).then(|| f.next().and_then(|p| p.parse().ok()))?
            })
            .unwrap_or_else(|| panic!("container {id} has no running task:\n{text}"))
    }
}

fn name(pod: &Value) -> String {
    pod["metadata"]["name"].as_str().unwrap_or_default().to_owned()
}

fn ready(pod: &Value) -> bool {
    pod["metadata"]["deletionTimestamp"].is_null()
        && pod["status"]["conditions"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
}

fn pod_ip(pod: &Value) -> String {
    pod["status"]["podIP"].as_str().unwrap_or_default().to_owned()
}

/// One JSON value per non-empty line.
fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// The claims of a JWT (the signature is checked by whoever validates it).
fn jwt_claims(token: &str) -> Value {
    let payload = token.trim().split('.').nth(1).expect("a JWT has three parts");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("base64url claims");
    serde_json::from_slice(&bytes).expect("JSON claims")
}

/// Fields of /proc/PID/status.
fn proc_status(pid: u32) -> std::collections::BTreeMap<String, String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"))
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
        .collect()
}

/// Capability numbers set in a /proc status mask.
fn caps(hex: &str) -> BTreeSet<u32> {
    let mask = u64::from_str_radix(hex, 16).expect("capability mask");
    (0..64).filter(|b| mask & (1 << b) != 0).collect()
}

const CAP_NET_ADMIN: u32 = 12;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// The `TcpExt: TCPSynRetrans` counter of a pod's network namespace.
fn syn_retransmits(k: &Kube, ns: &str, pod: &str) -> u64 {
    let text = k
        .exec(ns, pod, &["cat", "/proc/net/netstat"])
        .unwrap_or_else(|e| panic!("{e}"));
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("TcpExt:")).collect();
    assert_eq!(
        lines.len(),
        2,
        "TcpExt header and values in /proc/net/netstat:\n{text}"
    );
    let (names, values) = (lines[0].split_whitespace(), lines[1].split_whitespace());
    names
        .zip(values)
        .find(|(n, _)| *n == "TCPSynRetrans")
        .and_then(|(_, v)| v.parse().ok())
        .expect("TCPSynRetrans in TcpExt")
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn spiffe_id(ns: &str, sa: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/{ns}/sa/{sa}")
}

/// A namespace of this run's own; deleted when the test ends (the cluster
/// may outlive it: `make cluster` for a developer).
struct Namespace<'a> {
    k: &'a Kube,
    name: String,
}

impl Drop for Namespace<'_> {
    fn drop(&mut self) {
        let _ = self.k.run(&["delete", "namespace", &self.name, "--wait=false"]);
    }
}

/// What the workloads step created.
struct Workloads {
    ns: String,
    api_ip: String,
    /// Pods applied -> web's first X.509-SVID fetched (no failover).
    first_svid: Duration,
}

/// Polls until `pod` fetches its X.509-SVID; how long after `t0` it did.
fn first_svid_after(k: &Kube, ns: &str, pod: &str, t0: Instant) -> Duration {
    wait_until(
        Duration::from_secs(120),
        &format!("{pod} fetching its SVID"),
        || k.exec(ns, pod, &["node-agent", "svid", "fetch"]).is_ok(),
    );
    t0.elapsed()
}

fn workload_pod(ns: &str, name: &str, node: &str, command: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: {ns}
  labels: {{ app: {app} }}
spec:
  serviceAccountName: {sa}
  nodeName: {node}
  automountServiceAccountToken: false
  terminationGracePeriodSeconds: 1
  containers:
    - name: main
      image: {WORKLOAD_IMAGE}
      imagePullPolicy: Never
      command: ["/bin/sh", "-c", {command:?}]
      env:
        - name: SPIFFE_ENDPOINT_SOCKET
          value: unix:///run/spiffe/agent.sock
      volumeMounts:
        - name: spiffe
          mountPath: /run/spiffe
          readOnly: true
  volumes:
    - name: spiffe
      hostPath:
        path: /run/keyway/sockets
        type: Directory
"#,
        app = name.trim_end_matches(|c: char| c == '-' || c.is_ascii_digit()),
        sa = name.trim_end_matches(|c: char| c == '-' || c.is_ascii_digit()),
    )
}

const SLEEPER: &str = "exec sleep 2147483647";
const API_SERVER: &str = "nc -ll -p 8080 -e echo api-ok & exec nc -ll -p 9000 -e cat";

#[test]
fn keyway_installed_from_its_chart_does_its_job_on_a_real_node() {
    let k = Kube::from_env();
    let ready_nodes = k.json(&["get", "nodes"])["items"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter(|n| {
            n["status"]["conditions"]
                .as_array()
                .is_some_and(|c| c.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
        })
        .count();
    assert_eq!(ready_nodes, nodes(), "Ready nodes (KEYWAY_CLUSTER_NODES)");
    control_plane_replicas_are_ready_and_one_leads(&k);
    agent_runs_with_exactly_the_capabilities_the_chart_gives_it(&k);
    let ns = Namespace {
        k: &k,
        name: format!("shop-{}", std::process::id()),
    };
    let w = workloads_start(&k, &ns.name);
    workloads_fetch_x509_and_jwt_svids(&k, &w);
    policy_lets_the_authenticated_pair_in_and_drops_the_third_pod(&k, &w);
    if nodes() == 2 {
        a_cross_node_pair_is_authenticated_by_the_two_agents(&k, &w);
    }
    agent_rollout_keeps_connections_and_enforcement(&k, &w);
    leader_failover_keeps_the_ca_and_the_identities(&k, &w);
    deleting_the_client_pod_flushes_its_auth_entries(&k, &w);
}

/// The agent pod of `node` (exactly one).
fn agent_pod_on(k: &Kube, node: &str) -> Value {
    let pods: Vec<Value> = k
        .pods(SYSTEM_NS, "app.kubernetes.io/component=node-agent")
        .into_iter()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null() && p["spec"]["nodeName"] == node)
        .collect();
    assert_eq!(pods.len(), 1, "one agent pod on {node}: {pods:#?}");
    pods[0].clone()
}

/// The agent pod of the node the workloads run on.
fn agent_pod(k: &Kube) -> Value {
    agent_pod_on(k, NODE_1)
}

fn agent_exec(k: &Kube, cmd: &[&str]) -> Result<String, String> {
    agent_exec_on(k, NODE_1, cmd)
}

fn agent_exec_on(k: &Kube, node: &str, cmd: &[&str]) -> Result<String, String> {
    let agent = name(&agent_pod_on(k, node));
    let mut full = vec!["node-agent"];
    full.extend_from_slice(cmd);
    full.extend(["--admin-socket", ADMIN_SOCKET]);
    k.exec(SYSTEM_NS, &agent, &full)
}

fn lease_name(k: &Kube) -> String {
    let deploy = k.json(&[
        "get",
        "deployment",
        "-n",
        SYSTEM_NS,
        "-l",
        "app.kubernetes.io/component=control-plane",
    ]);
    let args: Vec<String> = deploy["items"][0]["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .expect("control-plane args")
        .iter()
        .map(|a| a.as_str().unwrap_or_default().to_owned())
        .collect();
    let i = args
        .iter()
        .position(|a| a == "--lease-name")
        .expect("--lease-name in the chart");
    args[i + 1].clone()
}

fn lease_holder(k: &Kube) -> String {
    let lease = k.json(&["get", "lease", "-n", SYSTEM_NS, &lease_name(k)]);
    lease["spec"]["holderIdentity"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// `keyway_is_leader` of each Ready control-plane replica that answers on
/// its metrics port, by pod name (callers wait for the count they expect).
fn leader_gauges(k: &Kube) -> Vec<(String, f64)> {
    k.pods(SYSTEM_NS, "app.kubernetes.io/component=control-plane")
        .iter()
        .filter(|p| ready(p))
        .filter_map(|p| {
            let (status, body) = http::get(&format!("{}:{CP_METRICS_PORT}", pod_ip(p)), "/metrics");
            if status != 200 {
                return None;
            }
            let v = http::value(&body, "keyway_is_leader").expect("/metrics has keyway_is_leader");
            Some((name(p), v))
        })
        .collect()
}

/// Both replicas Ready through their own probes; the Lease names one of
/// them, and that one alone says it leads.
fn control_plane_replicas_are_ready_and_one_leads(k: &Kube) {
    let deploy = k.json(&[
        "get",
        "deployment",
        "-n",
        SYSTEM_NS,
        "-l",
        "app.kubernetes.io/component=control-plane",
    ]);
    let probe = &deploy["items"][0]["spec"]["template"]["spec"]["containers"][0]["readinessProbe"];
    assert_eq!(
        probe["httpGet"]["path"], "/readyz",
        "the control plane's readiness probe: {probe}"
    );
    let mut pods = Vec::new();
    wait_until(
        Duration::from_secs(180),
        "two Ready control-plane replicas",
        || {
            pods = k.pods(SYSTEM_NS, "app.kubernetes.io/component=control-plane");
            pods.len() == 2 && pods.iter().all(ready)
        },
    );
    let names: BTreeSet<String> = pods.iter().map(name).collect();
    let mut holder = String::new();
    wait_until(
        Duration::from_secs(60),
        "a Lease holder among the replicas",
        || {
            holder = lease_holder(k);
            names.contains(&holder)
        },
    );
    let mut gauges = Vec::new();
    wait_until(
        Duration::from_secs(30),
        "exactly the Lease holder reports keyway_is_leader 1",
        || {
            gauges = leader_gauges(k);
            gauges.len() == 2 && gauges.iter().all(|(n, v)| (*v == 1.0) == (*n == holder))
        },
    );
    println!("control plane: replicas {names:?}, leader {holder}, keyway_is_leader {gauges:?}");
}

/// The DaemonSet's security settings as the kernel applies them to the
/// running agent: BPF, NET_ADMIN and PERFMON and nothing else (so not
/// privileged), no privilege escalation, the runtime's seccomp filter, the
/// host paths and the projected token mounted, no API token. The control
/// plane runs as 65532 with no capabilities.
fn agent_runs_with_exactly_the_capabilities_the_chart_gives_it(k: &Kube) {
    let mut agent = Value::Null;
    wait_until(Duration::from_secs(180), "the node agent pod Ready", || {
        agent = agent_pod(k);
        ready(&agent)
    });
    let spec = &agent["spec"];
    assert_eq!(spec["hostNetwork"], true);
    assert_eq!(spec["hostPID"], true);
    let container = &spec["containers"][0];
    assert_eq!(container["securityContext"]["privileged"], false);
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");

    let pid = k.container_pid(&agent);
    let st = proc_status(pid);
    let want: BTreeSet<u32> = [CAP_NET_ADMIN, CAP_PERFMON, CAP_BPF].into();
    assert_eq!(
        caps(&st["CapEff"]),
        want,
        "the agent's effective capabilities: {st:?}"
    );
    assert_eq!(caps(&st["CapBnd"]), want, "the agent's bounding set: {st:?}");
    assert_eq!(st["NoNewPrivs"], "1", "allowPrivilegeEscalation: false");
    assert_eq!(st["Seccomp"], "2", "the RuntimeDefault seccomp filter");
    assert!(st["Uid"].starts_with("0\t"), "runAsUser 0: {}", st["Uid"]);

    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).expect("mountinfo");
    let points: BTreeSet<&str> = mounts.lines().filter_map(|l| l.split(' ').nth(4)).collect();
    for p in [
        "/sys/fs/bpf",
        "/run/keyway/sockets",
        "/run/keyway/admin",
        "/var/lib/keyway/agent",
        "/var/run/secrets/keyway",
    ] {
        assert!(points.contains(p), "{p} is mounted into the agent: {points:?}");
    }
    assert!(
        !points.iter().any(|p| p.contains("kubernetes.io/serviceaccount")),
        "the agent gets no API token: {points:?}"
    );
    // The projected token: for audience keyway, bound to this very pod.
    let token =
        std::fs::read_to_string(format!("/proc/{pid}/root/var/run/secrets/keyway/token")).expect("token");
    let claims = jwt_claims(&token);
    assert!(
        claims["aud"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x == "keyway")),
        "{claims}"
    );
    assert_eq!(
        claims["kubernetes.io"]["pod"]["name"],
        name(&agent).as_str(),
        "{claims}"
    );
    assert_eq!(
        claims["kubernetes.io"]["serviceaccount"]["name"], "keyway-node-agent",
        "{claims}"
    );

    for cp in k.pods(SYSTEM_NS, "app.kubernetes.io/component=control-plane") {
        let st = proc_status(k.container_pid(&cp));
        assert!(
            st["Uid"].starts_with("65532\t"),
            "{}: runs as 65532: {}",
            name(&cp),
            st["Uid"]
        );
        assert!(
            caps(&st["CapEff"]).is_empty(),
            "{}: no capabilities: {}",
            name(&cp),
            st["CapEff"]
        );
        assert_eq!(st["NoNewPrivs"], "1");
    }
    println!(
        "agent {}: pid {pid}, CapEff {} (BPF, NET_ADMIN, PERFMON), Seccomp 2",
        name(&agent),
        st["CapEff"]
    );
}

/// Namespace, service accounts, the mutual-auth policy, and three pods.
fn workloads_start(k: &Kube, ns: &str) -> Workloads {
    let mut yaml = format!("apiVersion: v1\nkind: Namespace\nmetadata: {{ name: {ns} }}\n");
    for sa in ["web", "api", "intruder"] {
        yaml += &format!(
            "---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {{ name: {sa}, namespace: {ns} }}\n"
        );
    }
    yaml += &format!(
        r#"---
apiVersion: keyway.dev/v1alpha1
kind: KeywayNetworkPolicy
metadata: {{ name: api-mtls, namespace: {ns} }}
spec:
  endpointSelector: {{ matchLabels: {{ app: api }} }}
  ingress:
    - authentication: {{ mode: required }}
      fromEndpoints:
        - matchLabels: {{ app: web }}
      toPorts:
        - ports: [{{ port: "8080", protocol: TCP }}, {{ port: "9000", protocol: TCP }}]
"#
    );
    k.apply(&yaml);
    let t0 = Instant::now();
    k.apply(
        &[
            workload_pod(ns, "api", NODE_1, API_SERVER),
            workload_pod(ns, "web", NODE_1, SLEEPER),
            workload_pod(ns, "intruder", NODE_1, SLEEPER),
        ]
        .join("---\n"),
    );
    wait_until(Duration::from_secs(120), "the three workload pods Ready", || {
        let pods = k.pods(ns, "app");
        pods.len() == 3 && pods.iter().all(|p| ready(p) && !pod_ip(p).is_empty())
    });
    let pods_ready = t0.elapsed();
    let first_svid = first_svid_after(k, ns, "web", t0);
    println!(
        "workloads: three pods Ready {pods_ready:?} after they were applied, web's first SVID at {first_svid:?}"
    );
    Workloads {
        ns: ns.to_owned(),
        api_ip: pod_ip(&k.pod(ns, "api")),
        first_svid,
    }
}

fn fetch_x509(k: &Kube, ns: &str, pod: &str) -> (String, Vec<u8>, String) {
    let out = k
        .exec(
            ns,
            pod,
            &[
                "node-agent",
                "svid",
                "fetch",
                "--write",
                "/tmp/svid",
                "-o",
                "json",
            ],
        )
        .unwrap_or_else(|e| panic!("{pod}: svid fetch: {e}"));
    let id = json_lines(&out)[0]["spiffe_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let svid = k.exec(ns, pod, &["cat", "/tmp/svid/svid.pem"]).expect("svid.pem");
    let bundle = k
        .exec(ns, pod, &["cat", "/tmp/svid/bundle.pem"])
        .expect("bundle.pem");
    let (_, pem) = x509_parser::pem::parse_x509_pem(svid.as_bytes()).expect("svid.pem is PEM");
    (id, pem.contents, bundle)
}

/// The certificate's serial as the issuance log writes it (hex).
fn serial_hex(der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).expect("X.509");
    cert.raw_serial().iter().map(|b| format!("{b:02x}")).collect()
}

fn uri_sans(der: &[u8]) -> Vec<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).expect("X.509");
    let san = cert
        .subject_alternative_name()
        .expect("SAN")
        .expect("a SAN extension");
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .collect()
}

/// Two pods under different service accounts, with the Workload API socket
/// mounted from the host, each get an X.509-SVID naming their service
/// account and a JWT-SVID that the other's agent validates.
fn workloads_fetch_x509_and_jwt_svids(k: &Kube, w: &Workloads) {
    let ns = &w.ns;
    for sa in ["web", "api"] {
        let (id, leaf, _) = fetch_x509(k, ns, sa);
        assert_eq!(id, spiffe_id(ns, sa));
        assert_eq!(
            uri_sans(&leaf),
            vec![spiffe_id(ns, sa)],
            "{sa}: the SVID's one URI SAN"
        );
    }
    let audience = format!("{ns}-api");
    let out = k
        .exec(
            ns,
            "web",
            &["node-agent", "svid", "jwt", "--audience", &audience, "-o", "json"],
        )
        .unwrap_or_else(|e| panic!("svid jwt: {e}"));
    let jwt = &json_lines(&out)[0];
    let token = jwt["token"].as_str().expect("token");
    assert_eq!(jwt["spiffe_id"], spiffe_id(ns, "web").as_str());
    let claims = jwt_claims(token);
    assert_eq!(claims["sub"], spiffe_id(ns, "web").as_str(), "{claims}");
    assert!(
        claims["aud"] == audience.as_str()
            || claims["aud"]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x == audience.as_str())),
        "{claims}"
    );
    // The receiving pod validates it through its own Workload API.
    let validated = k
        .exec_stdin(
            ns,
            "api",
            &["node-agent", "svid", "validate-jwt", "--audience", &audience, "-"],
            token,
        )
        .unwrap_or_else(|e| panic!("validate-jwt: {e}"));
    assert_eq!(validated.trim(), spiffe_id(ns, "web"));
    let wrong = k.exec_stdin(
        ns,
        "api",
        &[
            "node-agent",
            "svid",
            "validate-jwt",
            "--audience",
            "someone-else",
            "-",
        ],
        token,
    );
    match wrong {
        Err(e) => assert!(
            e.contains("not meant for audience \"someone-else\"") && e.contains("InvalidArgument"),
            "refused for its audience: {e}"
        ),
        Ok(out) => panic!("a token for another audience must be refused: {out}"),
    }

    // Latency of a fetch as a pod sees it: 50 runs of the client in one
    // exec, against 50 runs of the same binary that only prints its version
    // (process start and exec overhead cancel out).
    const RUNS: u32 = 50;
    let timed = |cmd: &str| {
        let script = format!("for i in $(seq {RUNS}); do {cmd} >/dev/null || exit 1; done");
        let t = Instant::now();
        k.exec(ns, "web", &["sh", "-c", &script])
            .unwrap_or_else(|e| panic!("{cmd}: {e}"));
        t.elapsed()
    };
    let (mut fetch, mut version) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        version.push(timed("node-agent --version"));
        fetch.push(timed("node-agent svid fetch"));
    }
    let (f, v) = (median(fetch), median(version));
    println!(
        "svid fetch in a pod: {:?} per fetch ({RUNS} client runs {f:?} vs {RUNS} `--version` runs {v:?}, median of 3; ratio {:.2})",
        f.saturating_sub(v) / RUNS,
        f.as_secs_f64() / v.as_secs_f64()
    );
}

/// A request to api:8080 (a server that answers `api-ok` to every
/// connection): Ok when the answer came back. (busybox-static's nc: its
/// wget crashes on this Debian build, and nc needs no HTTP.)
fn request(k: &Kube, ns: &str, pod: &str, ip: &str, timeout_s: u32) -> Result<(), String> {
    match k.exec(ns, pod, &["nc", "-w", &timeout_s.to_string(), ip, "8080"]) {
        Ok(out) if out.trim() == "api-ok" => Ok(()),
        Ok(out) => Err(format!("{pod} -> {ip}:8080: no answer (got {out:?})")),
        // nc itself failed (timed out, refused): no answer either.
        Err(e) if e.contains("command terminated with exit code") => Err(e),
        // Anything else (the exec never ran) proves nothing about the network.
        Err(e) => panic!("{pod}: cannot run nc: {e}"),
    }
}

fn auth_pairs(k: &Kube) -> Vec<(String, String)> {
    let out = agent_exec(k, &["auth", "list", "-o", "json"]).unwrap_or_else(|e| panic!("auth list: {e}"));
    json_lines(&out)
        .iter()
        .map(|e| {
            (
                e["local_spiffe_id"].as_str().unwrap_or_default().to_owned(),
                e["remote_spiffe_id"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn pair_authenticated(k: &Kube, a: &str, b: &str) -> bool {
    auth_pairs(k)
        .iter()
        .any(|(l, r)| (l == a && r == b) || (l == b && r == a))
}

/// The drop of intruder -> `to`:8080 as `observe` on `node`'s agent shows
/// it (None while it has not shown it yet).
fn observed_drop(k: &Kube, node: &str, ns: &str, to: &str, since: &str) -> Option<Value> {
    let out = agent_exec_on(
        k,
        node,
        &[
            "observe",
            "-o",
            "json",
            "--namespace",
            ns,
            "--verdict",
            "DROPPED",
            "--port",
            "8080",
            "--since",
            since,
        ],
    )
    .unwrap_or_else(|e| panic!("observe on {node}: {e}"));
    json_lines(&out)
        .into_iter()
        .find(|f| f["source"]["pod"] == "intruder" && f["destination"]["pod"] == to)
}

fn explain(k: &Kube, ns: &str, from: &str, to: &str) -> Value {
    let out = agent_exec(
        k,
        &[
            "explain",
            "--from",
            &format!("{ns}/{from}"),
            "--to",
            &format!("{ns}/{to}"),
            "--port",
            "8080",
            "-o",
            "json",
        ],
    )
    .unwrap_or_else(|e| panic!("explain: {e}"));
    serde_json::from_str(out.trim()).expect("explain JSON")
}

/// The allowed pair (web -> api, authentication required) connects on its
/// first SYN: the pair was authenticated before it sent one. The third
/// pod is dropped, and the agent shows and explains that drop.
fn policy_lets_the_authenticated_pair_in_and_drops_the_third_pod(k: &Kube, w: &Workloads) {
    let ns = &w.ns;
    let t0 = Instant::now();
    wait_until(
        Duration::from_secs(60),
        "web <-> api authenticated (auth list)",
        || pair_authenticated(k, &spiffe_id(ns, "web"), &spiffe_id(ns, "api")),
    );
    println!(
        "policy: web <-> api pre-authenticated {:?} after the pods were Ready",
        t0.elapsed()
    );
    let before = syn_retransmits(k, ns, "web");
    let t = Instant::now();
    request(k, ns, "web", &w.api_ip, 5).unwrap_or_else(|e| panic!("web -> api must connect: {e}"));
    let first = t.elapsed();
    assert_eq!(
        syn_retransmits(k, ns, "web"),
        before,
        "the first connection needed no retransmitted SYN"
    );
    println!("policy: web -> api first connection (exec + nc) {first:?}, TCPSynRetrans unchanged ({before})");

    let refused = request(k, ns, "intruder", &w.api_ip, 2);
    assert!(refused.is_err(), "intruder -> api must be dropped: {refused:?}");
    let mut drop = None;
    wait_until(
        Duration::from_secs(20),
        "observe shows intruder -> api DROPPED",
        || {
            drop = observed_drop(k, NODE_1, ns, "api", "5m");
            drop.is_some()
        },
    );
    let drop = drop.unwrap();
    let reason = drop["drop_reason"].as_str().unwrap_or_default().to_owned();
    assert!(!reason.is_empty(), "a dropped flow names its reason: {drop}");
    assert_eq!(
        drop["source"]["spiffe_id"],
        spiffe_id(ns, "intruder").as_str(),
        "{drop}"
    );
    let why = explain(k, ns, "intruder", "api");
    assert_eq!(why["verdict"], "DROPPED", "{why:#}");
    assert_eq!(
        why["drop_reason"],
        reason.as_str(),
        "explain and observe agree: {why:#}"
    );
    let ok = explain(k, ns, "web", "api");
    assert_eq!(ok["verdict"], "FORWARDED", "{ok:#}");
    println!("policy: intruder -> api DROPPED ({reason}), explained the same way");
}

/// A line-echo connection web -> api:9000 held open through `kubectl exec -i`.
struct Echo {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Echo {
    fn open(k: &Kube, ns: &str, ip: &str) -> Echo {
        let mut child = k
            .command(&["exec", "-i", "-n", ns, "web", "--", "nc", ip, "9000"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("kubectl exec nc");
        let out = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Echo { child, lines }
    }

    /// Sends `text` and waits for it to come back.
    fn round_trip(&mut self, text: &str) -> Result<Duration, String> {
        let t = Instant::now();
        let stdin = self.child.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{text}").map_err(|e| format!("write: {e}"))?;
        stdin.flush().map_err(|e| format!("flush: {e}"))?;
        match self.lines.recv_timeout(Duration::from_secs(15)) {
            Ok(l) if l == text => Ok(t.elapsed()),
            Ok(l) => Err(format!("echoed {l:?}, sent {text:?}")),
            Err(e) => Err(format!("no echo of {text:?}: {e}")),
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The node id in an agent's "attested with ..." log line.
fn node_id_attested(log: &str) -> String {
    log.lines()
        .find(|l| l.contains("attested with"))
        .and_then(|l| l.split_whitespace().find_map(|f| f.strip_prefix("node_id=")))
        .unwrap_or_else(|| panic!("no attestation with a node_id in the agent's log:\n{log}"))
        .to_owned()
}

fn agent_log(k: &Kube, pod: &str) -> String {
    k.run(&["logs", "-n", SYSTEM_NS, pod])
        .unwrap_or_else(|e| panic!("{e}"))
}

/// `kubectl rollout restart` of the DaemonSet: the new agent re-attests with
/// its own pod's projected token (the control plane logs that pod) and keeps
/// the node's id, an established connection keeps flowing while no agent
/// runs (the programs and maps are pinned), and enforcement is whole once
/// the new pod is Ready.
fn agent_rollout_keeps_connections_and_enforcement(k: &Kube, w: &Workloads) {
    let ns = &w.ns;
    let old = agent_pod(k);
    let old_names: BTreeSet<String> = k
        .pods(SYSTEM_NS, "app.kubernetes.io/component=node-agent")
        .iter()
        .map(name)
        .collect();
    let old_attestation = agent_log(k, &name(&old));
    let mut echo = Echo::open(k, ns, &w.api_ip);
    let mut opened = Err(String::new());
    // nc connects asynchronously to the exec starting: the first line may
    // need the connection to finish first.
    wait_until(Duration::from_secs(20), "the echo connection to answer", || {
        opened = echo.round_trip("before");
        opened.is_ok()
    });
    let t0 = Instant::now();
    let ds = k.json(&[
        "get",
        "daemonset",
        "-n",
        SYSTEM_NS,
        "-l",
        "app.kubernetes.io/component=node-agent",
    ]);
    let ds = format!("daemonset/{}", name(&ds["items"][0]));
    k.must(&["rollout", "restart", "-n", SYSTEM_NS, &ds]);
    let mut during = 0u32;
    let mut new = Value::Null;
    wait_until(
        Duration::from_secs(240),
        "a new agent pod Ready on every node",
        || {
            if echo.round_trip(&format!("during-{during}")).is_ok() {
                during += 1;
            } else {
                panic!("the established connection broke during the agent's restart");
            }
            // Every node's agent replaced (one node at a time) and Ready.
            let pods = k.pods(SYSTEM_NS, "app.kubernetes.io/component=node-agent");
            new = pods
                .iter()
                .find(|p| p["spec"]["nodeName"] == NODE_1 && !old_names.contains(&name(p)))
                .cloned()
                .unwrap_or(Value::Null);
            pods.len() == nodes() && pods.iter().all(|p| !old_names.contains(&name(p)) && ready(p))
        },
    );
    let rollout = t0.elapsed();
    let rtt = echo
        .round_trip("after")
        .expect("the established connection survives the agent's restart");
    println!(
        "rollout: new agent {} Ready {rollout:?} after `rollout restart`; {during} echoes during it, one after ({rtt:?})",
        name(&new)
    );
    let (old_log, new_log) = (&old_attestation, agent_log(k, &name(&new)));
    assert!(
        new_log.contains("attested with a Kubernetes service account token"),
        "the new agent re-attests with its projected token:\n{new_log}"
    );
    assert_eq!(
        node_id_attested(&new_log),
        node_id_attested(old_log),
        "the node keeps its id"
    );
    let pod_ref = format!("pod={SYSTEM_NS}/{}", name(&new));
    let cp_logs: String = k
        .pods(SYSTEM_NS, "app.kubernetes.io/component=control-plane")
        .iter()
        .map(|p| k.run(&["logs", "-n", SYSTEM_NS, &name(p)]).unwrap_or_default())
        .collect();
    assert!(
        cp_logs.lines().any(
            |l| l.contains("node attested with a Kubernetes service account token") && l.contains(&pod_ref)
        ),
        "the control plane checked the new pod's token ({pod_ref}):\n{cp_logs}"
    );
    // Enforcement as before: the allowed pair connects at once, the third pod is dropped.
    let before = syn_retransmits(k, ns, "web");
    request(k, ns, "web", &w.api_ip, 5).expect("web -> api after the rollout");
    assert_eq!(
        syn_retransmits(k, ns, "web"),
        before,
        "no retransmitted SYN after the rollout"
    );
    assert!(
        request(k, ns, "intruder", &w.api_ip, 2).is_err(),
        "intruder still dropped after the rollout"
    );
    wait_until(
        Duration::from_secs(20),
        "the new agent observes the intruder's drop",
        || observed_drop(k, NODE_1, ns, "api", &format!("{}s", t0.elapsed().as_secs() + 1)).is_some(),
    );
}

/// Serials in the issuance log (ConfigMaps keyway-issuance-*): (serial, count).
fn issued_serials(k: &Kube) -> Vec<String> {
    let cms = k.json(&["get", "configmaps", "-n", SYSTEM_NS]);
    let mut serials = Vec::new();
    for cm in cms["items"].as_array().expect("items") {
        if !name(cm).starts_with("keyway-issuance-") {
            continue;
        }
        if let Some(data) = cm["data"].as_object() {
            for v in data.values() {
                let rec: Value = serde_json::from_str(v.as_str().expect("a string value"))
                    .unwrap_or_else(|e| panic!("an issuance record in {} is not JSON ({e}): {v}", name(cm)));
                serials.push(
                    rec["serial"]
                        .as_str()
                        .expect("a serial in every record")
                        .to_owned(),
                );
            }
        }
    }
    serials
}

/// Deleting the leading replica's pod: the other replica takes the Lease,
/// the CA is the same (a new SVID chains to the bundle workloads already
/// hold), the identity numbers are the same, and no serial is issued twice.
fn leader_failover_keeps_the_ca_and_the_identities(k: &Kube, w: &Workloads) {
    let ns = &w.ns;
    let leader = lease_holder(k);
    let (_, web_leaf_before, bundle_before) = fetch_x509(k, ns, "web");
    let ids_before = explain(k, ns, "web", "api");
    let ids = |e: &Value| {
        (
            e["source"]["identity"].clone(),
            e["destination"]["identity"].clone(),
        )
    };
    let t0 = Instant::now();
    k.must(&["delete", "pod", "-n", SYSTEM_NS, &leader, "--wait=false"]);
    // The next issuance: a new pod under an existing service account, applied
    // as the leader goes, fetching its first SVID.
    k.apply(&workload_pod(ns, "web-2", NODE_1, SLEEPER));
    let issued = first_svid_after(k, ns, "web-2", t0);
    println!(
        "failover: leader pod deleted -> a new pod's first SVID {issued:?} (without a failover: {:?}; ratio {:.2})",
        w.first_svid,
        issued.as_secs_f64() / w.first_svid.as_secs_f64()
    );
    let mut holder = String::new();
    wait_until(
        Duration::from_secs(90),
        "another replica holding the Lease",
        || {
            holder = lease_holder(k);
            !holder.is_empty() && holder != leader
        },
    );
    let took_lease = t0.elapsed();
    wait_until(
        Duration::from_secs(30),
        "the new holder reporting keyway_is_leader 1",
        || leader_gauges(k).iter().any(|(n, v)| *n == holder && *v == 1.0),
    );
    let leads = t0.elapsed();
    println!("failover: {leader} deleted; {holder} took the Lease after {took_lease:?}, led after {leads:?}");

    // What web-2 got: web's identity, from the same CA.
    let (id, leaf, bundle) = fetch_x509(k, ns, "web-2");
    assert_eq!(id, spiffe_id(ns, "web"));
    assert_eq!(uri_sans(&leaf), vec![spiffe_id(ns, "web")]);
    assert_eq!(bundle, bundle_before, "the same CA after the failover");
    let (_, web_leaf, bundle_web) = fetch_x509(k, ns, "web");
    assert_eq!(bundle_web, bundle_before);
    assert_eq!(
        ids(&explain(k, ns, "web", "api")),
        ids(&ids_before),
        "the same identity numbers"
    );
    // The kubelet removes it; the last step needs web to be the only pod
    // under its service account again.
    k.must(&[
        "delete",
        "pod",
        "-n",
        ns,
        "web-2",
        "--wait=true",
        "--timeout=180s",
    ]);

    wait_until(
        Duration::from_secs(180),
        "the Deployment back at two Ready replicas, one leading",
        || {
            let g = leader_gauges(k);
            g.len() == 2 && g.iter().filter(|(_, v)| *v == 1.0).count() == 1
        },
    );
    // Across every chunk: each serial once, and the SVIDs the workloads hold
    // (one issued before the failover, two after) among them.
    let serials = issued_serials(k);
    let unique: BTreeSet<&String> = serials.iter().collect();
    assert_eq!(unique.len(), serials.len(), "no serial issued twice: {serials:?}");
    for leaf in [&web_leaf_before, &leaf, &web_leaf] {
        let serial = serial_hex(leaf);
        assert!(
            unique.contains(&serial),
            "SVID serial {serial} is in the issuance log"
        );
    }
    println!(
        "failover: {} serials issued, all distinct; bundle and identity numbers unchanged",
        serials.len()
    );
}

/// Deleting the client pod (web was the only workload under its service
/// account on the node) flushes the pair's auth entries within seconds.
fn deleting_the_client_pod_flushes_its_auth_entries(k: &Kube, w: &Workloads) {
    let ns = &w.ns;
    let web = spiffe_id(ns, "web");
    wait_until(Duration::from_secs(60), "web <-> api authenticated", || {
        pair_authenticated(k, &web, &spiffe_id(ns, "api"))
    });
    let t0 = Instant::now();
    k.must(&["delete", "pod", "-n", ns, "web", "--wait=false"]);
    // When the kubelet has stopped the pod and the object is gone, and when
    // the agent has dropped the pair: the entries go with the pod, not
    // before (a terminating pod may still finish its requests).
    let (mut pod_gone, mut flushed) = (None, None);
    wait_until(
        Duration::from_secs(60),
        "web gone and its auth entries flushed",
        || {
            if pod_gone.is_none()
                && k.run(&["get", "pod", "-n", ns, "web"])
                    .is_err_and(|e| e.contains("NotFound"))
            {
                pod_gone = Some(t0.elapsed());
            }
            if flushed.is_none() && !auth_pairs(k).iter().any(|(l, r)| *l == web || *r == web) {
                flushed = Some(t0.elapsed());
            }
            pod_gone.is_some() && flushed.is_some()
        },
    );
    let (pod_gone, flushed) = (pod_gone.unwrap(), flushed.unwrap());
    assert!(
        flushed <= pod_gone + Duration::from_secs(5),
        "the auth entries outlived the pod by more than a few seconds: pod gone after {pod_gone:?}, entries after {flushed:?}"
    );
    println!(
        "auth: after `kubectl delete pod`, the pod object was gone at {pod_gone:?} and web's auth entries at {flushed:?}"
    );
}

/// Two nodes: `api-2` (service account api) on the second node. Its node's
/// agent authenticates web (node 1) with web's agent over the node network
/// before web's first SYN, and drops the intruder.
fn a_cross_node_pair_is_authenticated_by_the_two_agents(k: &Kube, w: &Workloads) {
    let ns = &w.ns;
    let t0 = Instant::now();
    k.apply(&workload_pod(ns, "api-2", NODE_2, API_SERVER));
    let mut pod = Value::Null;
    wait_until(Duration::from_secs(120), "api-2 Ready on the second node", || {
        pod = k.pod(ns, "api-2");
        ready(&pod) && !pod_ip(&pod).is_empty()
    });
    let ip = pod_ip(&pod);
    let (web, api) = (spiffe_id(ns, "web"), spiffe_id(ns, "api"));
    let remote = |node: &str, local_id: &str, remote_id: &str| {
        let out = agent_exec_on(k, node, &["auth", "list", "-o", "json"]).unwrap_or_else(|e| panic!("{e}"));
        json_lines(&out).into_iter().find(|e| {
            e["local_spiffe_id"] == local_id
                && e["remote_spiffe_id"] == remote_id
                && e["remote_node"] != node
                && e["via"] != "local"
        })
    };
    // The policy asks for authentication on ingress to api: api-2's node
    // holds the entry, made by a handshake between the two agents.
    let mut entry = None;
    wait_until(
        Duration::from_secs(60),
        "api <- web authenticated across the nodes",
        || {
            entry = remote(NODE_2, &api, &web);
            entry.is_some()
        },
    );
    let entry = entry.unwrap();
    assert_eq!(entry["remote_node"], NODE_1, "{entry}");
    println!(
        "cross-node: api-2 Ready and api <- web authenticated between the agents {:?} after it was applied (via {})",
        t0.elapsed(),
        entry["via"]
    );
    let before = syn_retransmits(k, ns, "web");
    request(k, ns, "web", &ip, 5).unwrap_or_else(|e| panic!("web -> api-2 across the nodes: {e}"));
    assert_eq!(
        syn_retransmits(k, ns, "web"),
        before,
        "no retransmitted SYN across the nodes"
    );
    assert!(
        request(k, ns, "intruder", &ip, 2).is_err(),
        "intruder -> api-2 must be dropped"
    );
    wait_until(
        Duration::from_secs(20),
        "the second node's agent shows the intruder's drop",
        || observed_drop(k, NODE_2, ns, "api-2", "5m").is_some(),
    );
    k.must(&["delete", "pod", "-n", ns, "api-2", "--wait=true", "--timeout=60s"]);
}
