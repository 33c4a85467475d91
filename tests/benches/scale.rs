//! `make bench-scale` (also run by `make bench`): Kubernetes mode at cluster
//! scale, against the real kube-apiserver and etcd the Kubernetes tier uses.
//!
//! For each scenario (pods, nodes, identities) the load process creates the
//! Node, ServiceAccount and Pod objects through the API, with pod status
//! (phase, IP) set through the status subresource as a kubelet would; no
//! kubelet runs. It starts the real `control-plane serve --kubernetes
//! --store kubernetes` binary and simulates one agent per node: a join-token
//! attestation and a real mTLS gRPC Sync stream, all from this process. Then:
//!
//! - pod churn at 100 changes/s (creates and deletes, identities that
//!   exist): pod created/deleted -> its node's agent has it, p50/p99;
//!   API-server writes per change (the apiserver's own request counter,
//!   Keyway's resources only: configmaps, secrets, policy status; not the
//!   Lease); Sync bytes per change to the pod's node and to every other node;
//! - control-plane RSS at steady state (and its peak);
//! - a restart: SIGTERM, start again, time until every node's agent has a
//!   complete sync with all its pods (cold caches, warm store);
//! - Keyway's objects in its namespace: count and bytes.
//!
//! The same scenario runs against the control plane as it was before per-
//! object state (`KEYWAY_SCALE_BASELINE`, built by scripts/scale-baseline.sh
//! from the commit it names), in the same run, up to where it stops; the
//! report gives the ratios. Scenarios: `KEYWAY_SCALE=PODS:NODES:IDS,...`;
//! `KEYWAY_SCALE_RETENTION=off` skips the storage-under-rotation phase
//! (six minutes; its table is then empty), to look at one scenario.
//! Writes `bench-results/scale.md`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Namespace, Node, Pod, PodIP, PodSpec, PodStatus, Secret, ServiceAccount,
};
use keyway_tests::bench::percentile;
use keyway_tests::kube::cluster;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use node_agent::control_plane::{ControlPlaneClient, attest_with_join_token};
use prost::Message;
use proto::keyway::{self as pb, update::Kind};
use tokio::sync::watch;

const TD: &str = keyway_tests::TD;
const CHURN_PER_SEC: u64 = 100;
const CHURN_SECS: u64 = 20;
const NAMESPACES: usize = 10;
const IN_FLIGHT: usize = 48;
/// How long a phase may take before the scenario is called stopped.
const PHASE_LIMIT: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Copy)]
struct Scenario {
    pods: usize,
    nodes: usize,
    identities: usize,
}

fn scenarios() -> Vec<Scenario> {
    let spec = std::env::var("KEYWAY_SCALE")
        .unwrap_or_else(|_| "1000:100:1000,10000:1000:1000,10000:1000:10000".into());
    spec.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            let n: Vec<usize> = s
                .split(':')
                .map(|x| x.trim().parse().expect("KEYWAY_SCALE: PODS:NODES:IDS,..."))
                .collect();
            assert_eq!(n.len(), 3, "KEYWAY_SCALE: PODS:NODES:IDS,...");
            Scenario {
                pods: n[0],
                nodes: n[1],
                identities: n[2],
            }
        })
        .collect()
}

fn ns_of(identity: usize) -> String {
    format!("scale-{}", identity % NAMESPACES)
}

fn sa_of(identity: usize) -> String {
    format!("sa-{identity}")
}

fn node_name(i: usize) -> String {
    format!("scale-node-{i:04}")
}

fn pod_ip(serial: usize) -> String {
    format!(
        "10.{}.{}.{}",
        64 + serial / 65536,
        (serial / 256) % 256,
        serial % 256
    )
}

/// What one simulated agent has been sent.
#[derive(Debug, Default)]
struct Seen {
    workloads: HashSet<String>,
    /// Complete syncs since the last reset (a snapshot counts once done).
    complete_after_reset: bool,
    complete_at: Option<Instant>,
    first_seen: HashMap<String, Instant>,
    gone_at: HashMap<String, Instant>,
    node_scoped_bytes: u64,
    cluster_wide_bytes: u64,
    connected: bool,
}

type Agents = Arc<Vec<(String, Arc<Mutex<Seen>>)>>;

/// One churn operation: created (or deleted), on which node, which pod
/// (namespace/name), when the call started.
type Op = (bool, String, String, Instant);

fn classify(u: &pb::Update) -> bool {
    // true: node-scoped (only the pod's node gets it)
    matches!(
        u.kind,
        Some(
            Kind::WorkloadUpsert(_) | Kind::WorkloadDelete(_) | Kind::PolicyUpsert(_) | Kind::PolicyDelete(_)
        )
    )
}

async fn run_agent(
    server: String,
    bundle: Arc<keyway_identity::TrustBundle>,
    node: String,
    token: String,
    seen: Arc<Mutex<Seen>>,
    mut stop: watch::Receiver<bool>,
) {
    let identity = loop {
        match attest_with_join_token(&server, bundle.clone(), &node, &token).await {
            Ok(id) => break id,
            Err(e) => {
                if *stop.borrow() {
                    return;
                }
                eprintln!("{node}: attest: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    let (_b, bundle_rx) = watch::channel(bundle);
    let (_c, cert) = watch::channel(Some(identity.svid.certified_key().expect("node key")));
    loop {
        if *stop.borrow() {
            return;
        }
        let stream = async {
            let mut client = ControlPlaneClient::connect(&server, bundle_rx.clone(), cert.clone()).await?;
            client.sync(0, Vec::new()).await
        }
        .await;
        let mut stream = match stream {
            Ok(s) => s,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        seen.lock().unwrap().connected = true;
        loop {
            let msg = tokio::select! {
                m = stream.message() => m,
                _ = stop.changed() => return,
            };
            let Ok(Some(msg)) = msg else { break };
            let now = Instant::now();
            let mut s = seen.lock().unwrap();
            if msg.reset {
                s.workloads.clear();
                s.complete_after_reset = false;
            }
            for u in &msg.updates {
                let len = u.encoded_len() as u64;
                if classify(u) {
                    s.node_scoped_bytes += len;
                } else {
                    s.cluster_wide_bytes += len;
                }
                match &u.kind {
                    Some(Kind::WorkloadUpsert(w)) => {
                        let key = format!("{}/{}", w.namespace, w.name);
                        s.first_seen.entry(key.clone()).or_insert(now);
                        s.workloads.insert(key);
                    }
                    Some(Kind::WorkloadDelete(r)) => {
                        let key = format!("{}/{}", r.namespace, r.name);
                        s.gone_at.entry(key.clone()).or_insert(now);
                        s.workloads.remove(&key);
                    }
                    _ => {}
                }
            }
            if msg.complete {
                s.complete_after_reset = true;
                s.complete_at = Some(now);
            }
        }
        seen.lock().unwrap().connected = false;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The real control-plane binary (this tree's or the baseline's).
struct ControlPlaneProcess {
    child: Child,
    admin_socket: PathBuf,
    binary: PathBuf,
    listen: String,
}

impl ControlPlaneProcess {
    fn spawn(binary: &Path, data: &Path, listen: &str, namespace: &str, log: &Path, extra: &[&str]) -> Self {
        std::fs::create_dir_all(data).expect("data dir");
        let admin_socket = data.join("admin.sock");
        let _ = std::fs::remove_file(&admin_socket);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log");
        let child = Command::new(binary)
            .arg("serve")
            .args(["--trust-domain", TD, "--listen", listen])
            .arg("--data-dir")
            .arg(data)
            .args([
                "--kubernetes",
                "--store",
                "kubernetes",
                "--namespace",
                namespace,
                "--holder-identity",
                "scale-0",
                "--allow-join-tokens",
                "--attest-per-minute",
                "0",
                "--max-connections-per-peer",
                "100000",
                "--metrics-address",
                "off",
            ])
            .args(extra)
            .env("KUBECONFIG", &cluster().kubeconfig)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn control-plane");
        let p = Self {
            child,
            admin_socket,
            binary: binary.to_owned(),
            listen: listen.to_owned(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::os::unix::net::UnixStream::connect(&p.admin_socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "the control plane did not start; see its log"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        p
    }

    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new(&self.binary)
            .args(args)
            .env("KEYWAY_ADMIN_SOCKET", &self.admin_socket)
            .output()
            .expect("run control-plane");
        assert!(
            out.status.success(),
            "control-plane {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8")
    }

    fn status_kib(&self, field: &str) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix(field))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            })
            .unwrap_or(0)
    }

    /// SIGTERM (a clean shutdown releases the Lease), then wait.
    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ControlPlaneProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sums `apiserver_request_total` for the writes Keyway makes.
async fn keyway_writes() -> f64 {
    let k = cluster();
    let token_file = &k.env["KEYWAY_APISERVER_TOKEN_FILE"];
    let token = std::fs::read_to_string(token_file).expect("admin token");
    let out = Command::new("curl")
        .args(["-sf", "--cacert"])
        .arg(&k.ca_file)
        .args(["-H", &format!("Authorization: Bearer {}", token.trim())])
        .arg(format!("{}/metrics", k.server))
        .output()
        .expect("curl");
    assert!(out.status.success(), "apiserver /metrics");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
        .filter(|l| {
            ["POST", "PUT", "PATCH", "DELETE"]
                .iter()
                .any(|v| l.contains(&format!("verb=\"{v}\"")))
        })
        .filter(|l| {
            ["configmaps", "secrets", "keywaynetworkpolicies"]
                .iter()
                .any(|r| l.contains(&format!("resource=\"{r}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn etcd_db_bytes() -> Option<f64> {
    let url = cluster().env.get("KEYWAY_ETCD")?.clone();
    let out = Command::new("curl")
        .args(["-sf", &format!("{url}/metrics")])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("etcd_mvcc_db_total_size_in_use_in_bytes "))
        .and_then(|v| v.trim().parse().ok())
}

/// Keyway's objects in its namespace: count and bytes (as JSON).
async fn keyway_objects(client: &kube::Client, ns: &str) -> (usize, usize) {
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let mut n = 0;
    let mut bytes = 0;
    for cm in cms.list(&ListParams::default()).await.expect("list").items {
        n += 1;
        bytes += serde_json::to_vec(&cm).map(|v| v.len()).unwrap_or(0);
    }
    for s in secrets.list(&ListParams::default()).await.expect("list").items {
        n += 1;
        bytes += serde_json::to_vec(&s).map(|v| v.len()).unwrap_or(0);
    }
    (n, bytes)
}

fn pod(name: &str, identity: usize, node: &str) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns_of(identity)),
            labels: Some(BTreeMap::from([
                ("app".to_string(), sa_of(identity)),
                ("pod-template-hash".to_string(), format!("h{}", name.len())),
            ])),
            ..Default::default()
        },
        spec: Some(PodSpec {
            service_account_name: Some(sa_of(identity)),
            node_name: Some(node.into()),
            automount_service_account_token: Some(false),
            containers: vec![Container {
                name: "app".into(),
                image: Some("example.invalid/app:1".into()),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn create_pod(client: &kube::Client, name: String, identity: usize, node: String, ip: String) {
    let api: Api<Pod> = Api::namespaced(client.clone(), &ns_of(identity));
    api.create(&PostParams::default(), &pod(&name, identity, &node))
        .await
        .unwrap_or_else(|e| panic!("create pod {name}: {e}"));
    let status = serde_json::json!({
        "status": PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some(ip.clone()),
            pod_ips: Some(vec![PodIP { ip }]),
            ..Default::default()
        }
    });
    api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap_or_else(|e| panic!("pod {name} status: {e}"));
}

async fn delete_pod(client: &kube::Client, ns: &str, name: &str) {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    match api.delete(name, &DeleteParams::default().grace_period(0)).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => panic!("delete pod {name}: {e}"),
    }
}

/// Creates the scenario's objects; returns the pods per node.
async fn populate(client: &kube::Client, sc: Scenario) -> HashMap<String, usize> {
    for i in 0..NAMESPACES {
        ensure_namespace(client, &format!("scale-{i}")).await;
    }
    let nodes: Api<Node> = Api::all(client.clone());
    futures::stream::iter(0..sc.nodes)
        .map(|i| {
            let nodes = nodes.clone();
            async move {
                let n = Node {
                    metadata: ObjectMeta {
                        name: Some(node_name(i)),
                        labels: Some(BTreeMap::from([("keyway.dev/scale".into(), "true".into())])),
                        ..Default::default()
                    },
                    ..Default::default()
                };
                let _ = nodes.create(&PostParams::default(), &n).await;
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect::<Vec<_>>()
        .await;
    futures::stream::iter(0..sc.identities)
        .map(|i| {
            let client = client.clone();
            async move {
                let api: Api<ServiceAccount> = Api::namespaced(client, &ns_of(i));
                let sa = ServiceAccount {
                    metadata: ObjectMeta {
                        name: Some(sa_of(i)),
                        ..Default::default()
                    },
                    ..Default::default()
                };
                let _ = api.create(&PostParams::default(), &sa).await;
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect::<Vec<_>>()
        .await;
    let mut per_node: HashMap<String, usize> = HashMap::new();
    for p in 0..sc.pods {
        *per_node.entry(node_name(p % sc.nodes)).or_default() += 1;
    }
    futures::stream::iter(0..sc.pods)
        .map(|p| {
            create_pod(
                client,
                format!("pod-{p}"),
                p % sc.identities,
                node_name(p % sc.nodes),
                pod_ip(p),
            )
        })
        .buffer_unordered(IN_FLIGHT)
        .collect::<Vec<_>>()
        .await;
    per_node
}

/// Creates namespace `name` unless it exists.
async fn ensure_namespace(client: &kube::Client, name: &str) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..Default::default()
        },
        ..Default::default()
    };
    let _ = namespaces.create(&PostParams::default(), &ns).await;
}

/// Removes the scenario's pods and nodes.
async fn clean_population(client: &kube::Client) {
    for i in 0..NAMESPACES {
        let api: Api<Pod> = Api::namespaced(client.clone(), &format!("scale-{i}"));
        let _ = api
            .delete_collection(&DeleteParams::default().grace_period(0), &ListParams::default())
            .await;
    }
    let nodes: Api<Node> = Api::all(client.clone());
    let _ = nodes
        .delete_collection(
            &DeleteParams::default(),
            &ListParams::default().labels("keyway.dev/scale=true"),
        )
        .await;
}

/// Removes Keyway's objects (a fresh store for the next run).
async fn clean_keyway(client: &kube::Client, keyway_ns: &str) {
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), keyway_ns);
    let _ = configmaps
        .delete_collection(&DeleteParams::default(), &ListParams::default())
        .await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), keyway_ns);
    let _ = secrets
        .delete_collection(&DeleteParams::default(), &ListParams::default())
        .await;
}

#[derive(Debug, Default, Clone)]
struct Figures {
    /// Why the scenario stopped early, if it did.
    stopped: Option<String>,
    first_sync: Option<Duration>,
    cold_start: Option<Duration>,
    rss_mib: f64,
    peak_mib: f64,
    p50: Option<Duration>,
    p99: Option<Duration>,
    lost: usize,
    writes_per_change: Option<f64>,
    node_bytes_per_change: Option<f64>,
    other_bytes_per_change_per_node: Option<f64>,
    objects: (usize, usize),
    etcd_mib: Option<f64>,
}

/// What the baseline's store says when `keyway-state` would pass 900 KiB.
const STATE_FULL: &str = "a ConfigMap can hold";

/// Waits until every agent has a complete sync (after `since`) holding all
/// its pods; why not, on timeout or when the control plane's log shows its
/// store refusing the state.
async fn all_synced(
    agents: &Agents,
    per_node: &HashMap<String, usize>,
    since: Instant,
    log: &Path,
) -> Result<Instant, String> {
    let deadline = Instant::now() + PHASE_LIMIT;
    loop {
        let mut last = since;
        let done = agents.iter().all(|(node, seen)| {
            let s = seen.lock().unwrap();
            let want = per_node.get(node).copied().unwrap_or(0);
            let ok = s.complete_after_reset
                && s.workloads.len() == want
                && s.complete_at.is_some_and(|t| t >= since);
            if let Some(t) = s.complete_at {
                last = last.max(t);
            }
            ok
        });
        if done {
            return Ok(last);
        }
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains(STATE_FULL)) {
            let why = line.split_once("error=").map_or(line, |(_, e)| e);
            return Err(format!(
                "the store refused: {}",
                why.chars().take(240).collect::<String>()
            ));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "no complete sync within {PHASE_LIMIT:?}{}",
                log_hint(log)
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One build against the scenario's objects. `round` picks the pods its
/// churn deletes and names the ones it creates, so two builds can run on
/// one population; `per_node` (pods per node) is updated with its churn.
async fn run_scenario(
    sc: Scenario,
    binary: &Path,
    label: &str,
    work: &Path,
    round: usize,
    per_node: &mut HashMap<String, usize>,
) -> Figures {
    let client = cluster().admin().await;
    let mut fig = Figures::default();
    let keyway_ns = format!("keyway-scale-{label}");
    ensure_namespace(&client, &keyway_ns).await;
    clean_keyway(&client, &keyway_ns).await;

    let data = work.join(label);
    let _ = std::fs::remove_dir_all(&data);
    let log = work.join(format!("{label}.log"));
    // One log per run: an earlier scenario's refusal must not stop this one.
    let _ = std::fs::remove_file(&log);
    let listen = format!("127.0.0.1:{}", free_port());
    let started = Instant::now();
    let cp = ControlPlaneProcess::spawn(binary, &data, &listen, &keyway_ns, &log, &[]);
    let bundle_pem = cp.cli(&["bundle", "show"]);
    let td = keyway_identity::spiffe_id::parse_trust_domain(TD).expect("td");
    let bundle = Arc::new(keyway_identity::TrustBundle::from_pem(td, &bundle_pem).expect("bundle"));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut agents = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..sc.nodes {
        let node = node_name(i);
        let token = cp.cli(&["token", "create", "--node", &node]).trim().to_owned();
        let seen = Arc::new(Mutex::new(Seen::default()));
        agents.push((node.clone(), seen.clone()));
        tasks.push(tokio::spawn(run_agent(
            listen.clone(),
            bundle.clone(),
            node,
            token,
            seen,
            stop_rx.clone(),
        )));
    }
    let agents: Agents = Arc::new(agents);
    match all_synced(&agents, per_node, started, &log).await {
        Ok(at) => fig.first_sync = Some(at - started),
        Err(why) => {
            let synced: usize = agents
                .iter()
                .map(|(_, s)| s.lock().unwrap().workloads.len())
                .sum();
            fig.stopped = Some(format!("{why} ({synced} of {} pods reached agents)", sc.pods));
            let _ = stop_tx.send(true);
            cp.stop();
            return fig;
        }
    }
    eprintln!(
        "[{label}] every node synced {:.1?} after start",
        fig.first_sync.unwrap()
    );

    // Churn: creates of new pods and deletes of existing ones, alternating.
    let writes_before = keyway_writes().await;
    let bytes_before: Vec<(u64, u64)> = agents
        .iter()
        .map(|(_, s)| {
            let s = s.lock().unwrap();
            (s.node_scoped_bytes, s.cluster_wide_bytes)
        })
        .collect();
    // Every delete removes a distinct original pod, also across rounds.
    let changes = ((CHURN_PER_SEC * CHURN_SECS) as usize).min(sc.pods);
    let ops: Arc<Mutex<Vec<Op>>> = Arc::new(Mutex::new(Vec::new()));
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / CHURN_PER_SEC));
    let mut running = Vec::new();
    for k in 0..changes {
        tick.tick().await;
        let client = client.clone();
        let ops = ops.clone();
        if k % 2 == 0 {
            let serial = sc.pods + k;
            let identity = k % sc.identities;
            let node = node_name(k % sc.nodes);
            let name = format!("churn-{round}-{k}");
            running.push(tokio::spawn(async move {
                let t0 = Instant::now();
                create_pod(&client, name.clone(), identity, node.clone(), pod_ip(serial)).await;
                ops.lock()
                    .unwrap()
                    .push((true, node, format!("{}/{name}", ns_of(identity)), t0));
            }));
        } else {
            let p = round * changes / 2 + k / 2;
            let identity = p % sc.identities;
            let node = node_name(p % sc.nodes);
            running.push(tokio::spawn(async move {
                let ns = ns_of(identity);
                let name = format!("pod-{p}");
                let t0 = Instant::now();
                delete_pod(&client, &ns, &name).await;
                ops.lock()
                    .unwrap()
                    .push((false, node, format!("{ns}/{name}"), t0));
            }));
        }
    }
    for r in running {
        let _ = r.await;
    }
    let by_node: HashMap<String, Arc<Mutex<Seen>>> = agents.iter().cloned().collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    let latencies = loop {
        let ops = ops.lock().unwrap().clone();
        let mut lat = Vec::new();
        let mut missing = 0;
        for (create, node, key, t0) in &ops {
            let s = by_node[node].lock().unwrap();
            let at = if *create {
                s.first_seen.get(key)
            } else {
                s.gone_at.get(key)
            };
            match at {
                Some(at) => lat.push(at.saturating_duration_since(*t0)),
                None => missing += 1,
            }
        }
        if missing == 0 || Instant::now() > deadline {
            fig.lost = missing;
            break lat;
        }
        drop(ops);
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    fig.p50 = percentile(&latencies, 0.50);
    fig.p99 = percentile(&latencies, 0.99);
    let writes_after = keyway_writes().await;
    fig.writes_per_change = Some((writes_after - writes_before) / changes as f64);
    let mut node_scoped = 0u64;
    let mut cluster_wide = 0u64;
    for ((_, s), (n0, c0)) in agents.iter().zip(&bytes_before) {
        let s = s.lock().unwrap();
        node_scoped += s.node_scoped_bytes - n0;
        cluster_wide += s.cluster_wide_bytes - c0;
    }
    fig.node_bytes_per_change = Some(node_scoped as f64 / changes as f64);
    fig.other_bytes_per_change_per_node = Some(cluster_wide as f64 / changes as f64 / sc.nodes.max(1) as f64);
    fig.rss_mib = cp.status_kib("VmRSS:") as f64 / 1024.0;
    fig.peak_mib = cp.status_kib("VmHWM:") as f64 / 1024.0;
    fig.objects = keyway_objects(&client, &keyway_ns).await;
    fig.etcd_mib = etcd_db_bytes().await.map(|b| b / 1048576.0);
    eprintln!(
        "[{label}] churn p50 {:?} p99 {:?} lost {}, {:.2} writes/change, rss {:.0} MiB",
        fig.p50,
        fig.p99,
        fig.lost,
        fig.writes_per_change.unwrap_or(0.0),
        fig.rss_mib
    );

    // Restart: cold caches, the store as it is.
    for (create, node, _, _) in ops.lock().unwrap().iter() {
        let n = per_node.entry(node.clone()).or_default();
        if *create {
            *n += 1;
        } else {
            *n -= 1;
        }
    }
    let binary = cp.binary.clone();
    let listen = cp.listen.clone();
    cp.stop();
    let restarted = Instant::now();
    let cp = ControlPlaneProcess::spawn(&binary, &data, &listen, &keyway_ns, &log, &[]);
    match all_synced(&agents, per_node, restarted, &log).await {
        Ok(at) => fig.cold_start = Some(at - restarted),
        Err(why) => fig.stopped = Some(format!("after a restart: {why}")),
    }
    fig.peak_mib = fig.peak_mib.max(cp.status_kib("VmHWM:") as f64 / 1024.0);
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    cp.stop();
    clean_keyway(&client, &keyway_ns).await;
    fig
}

/// One sample of what a control plane keeps while SVIDs rotate.
#[derive(Debug, Clone)]
struct Held {
    at: Duration,
    issued: usize,
    /// `None` where the control plane has no `ListIssuance` (the baseline).
    records: Option<u64>,
    objects: usize,
    bytes: usize,
    etcd_mib: Option<f64>,
}

const RENEW_EVERY: Duration = Duration::from_secs(30);
const RETENTION_ROUNDS: usize = 12;
const RETENTION_IDENTITIES: usize = 1000;

/// A compressed day of rotations: 1000 identities renewed every 30 s with
/// a 60 s TTL (renewal at half-life, as agents do), the log kept 30 s past
/// expiry; samples of what is held every 30 s. Issued through the admin
/// API (no placement check), so no pods are needed.
async fn retention(binary: &Path, label: &str, work: &Path) -> Vec<Held> {
    let client = cluster().admin().await;
    let keyway_ns = format!("keyway-retention-{label}");
    ensure_namespace(&client, &keyway_ns).await;
    clean_keyway(&client, &keyway_ns).await;
    let data = work.join(format!("retention-{label}"));
    let _ = std::fs::remove_dir_all(&data);
    let log = work.join(format!("retention-{label}.log"));
    let listen = format!("127.0.0.1:{}", free_port());
    let cp = ControlPlaneProcess::spawn(
        binary,
        &data,
        &listen,
        &keyway_ns,
        &log,
        &["--issuance-keep-after-expiry", "30s"],
    );
    let mut admin = control_plane::admin::connect(&cp.admin_socket)
        .await
        .expect("admin socket");
    let csrs: Vec<Vec<u8>> = (0..32)
        .map(|_| keyway_identity::csr::generate().expect("csr").1)
        .collect();
    let start = Instant::now();
    let mut issued = 0;
    let mut samples = Vec::new();
    for round in 0..RETENTION_ROUNDS {
        let due = start + RENEW_EVERY * round as u32;
        tokio::time::sleep_until(due.into()).await;
        let results: Vec<bool> = futures::stream::iter(0..RETENTION_IDENTITIES)
            .map(|i| {
                let mut admin = admin.clone();
                let csr = csrs[i % csrs.len()].clone();
                async move {
                    admin
                        .mint_x509_svid(pb::MintX509SvidRequest {
                            spiffe_id: format!("spiffe://{TD}/ns/rotation/sa/sa-{i}"),
                            csr,
                            ttl_seconds: 60,
                        })
                        .await
                        .is_ok()
                }
            })
            .buffer_unordered(16)
            .collect()
            .await;
        issued += results.iter().filter(|ok| **ok).count();
        let held = admin
            .list_issuance(pb::ListIssuanceRequest {
                limit: 1,
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().held)
            .ok();
        let (objects, bytes) = keyway_objects(&client, &keyway_ns).await;
        samples.push(Held {
            at: start.elapsed(),
            issued,
            records: held,
            objects,
            bytes,
            etcd_mib: etcd_db_bytes().await.map(|b| b / 1048576.0),
        });
        eprintln!("[{label}] retention {:?}", samples.last().unwrap());
    }
    cp.stop();
    clean_keyway(&client, &keyway_ns).await;
    samples
}

fn log_hint(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .rev()
        .find(|l| l.contains("ERROR") || l.contains("WARN"))
        .map(|l| format!("; last warning: {}", l.chars().take(300).collect::<String>()))
        .unwrap_or_default()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn ms(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| format!("{:.0}", d.as_secs_f64() * 1000.0))
}

fn secs(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| format!("{:.1}", d.as_secs_f64()))
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.digits$}"))
}

fn ratio(new: Option<f64>, old: Option<f64>) -> String {
    match (new, old) {
        (Some(n), Some(o)) if o > 0.0 => format!("{:.2}", n / o),
        _ => "-".into(),
    }
}

#[tokio::main]
async fn main() {
    keyway_tests::kube::install_crd(&cluster().admin().await).await;
    let work = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/scale");
    std::fs::create_dir_all(&work).expect("work dir");
    let current = keyway_tests::bin("control-plane");
    let baseline = std::env::var("KEYWAY_SCALE_BASELINE").ok().map(PathBuf::from);
    let baseline_rev = std::env::var("KEYWAY_SCALE_BASELINE_REV").unwrap_or_else(|_| "?".into());
    if let Some(b) = &baseline {
        assert!(
            std::fs::read(b).expect("baseline binary")
                != std::fs::read(&current).expect("control-plane binary"),
            "{} is the baseline binary: build this tree's binaries after scripts/scale-baseline.sh \
             (`make bench-scale` does)",
            current.display()
        );
    }
    // Storage under rotation first: it takes a fixed time, and the largest
    // scenario last may not finish.
    let skip_retention = std::env::var("KEYWAY_SCALE_RETENTION").is_ok_and(|v| v == "off");
    let retention_current = if skip_retention {
        Vec::new()
    } else {
        retention(&current, "current", &work).await
    };
    let retention_baseline = match &baseline {
        _ if skip_retention => None,
        Some(b) => Some(retention(b, "baseline", &work).await),
        None => None,
    };
    report(
        &[],
        &retention_current,
        retention_baseline.as_deref(),
        &baseline_rev,
    );
    let mut rows = Vec::new();
    let client = cluster().admin().await;
    for sc in scenarios() {
        clean_population(&client).await;
        let t = Instant::now();
        let mut per_node = populate(&client, sc).await;
        eprintln!("{sc:?}: objects created in {:.0?}", t.elapsed());
        let new = run_scenario(sc, &current, "current", &work, 0, &mut per_node).await;
        let old = match &baseline {
            Some(b) => Some(run_scenario(sc, b, "baseline", &work, 1, &mut per_node).await),
            None => None,
        };
        rows.push((sc, new, old));
        clean_population(&client).await;
        // Written after every scenario: what ran is kept if a larger one
        // cannot finish.
        report(
            &rows,
            &retention_current,
            retention_baseline.as_deref(),
            &baseline_rev,
        );
    }

    report(
        &rows,
        &retention_current,
        retention_baseline.as_deref(),
        &baseline_rev,
    );
}

type Row = (Scenario, Figures, Option<Figures>);

/// Writes `bench-results/scale.md` from what has run so far.
fn report(rows: &[Row], retention_current: &[Held], retention_baseline: Option<&[Held]>, baseline_rev: &str) {
    let mut md = format!(
        "# Kubernetes-mode scale benchmark\n\n\
         Measured by `make bench-scale` on this machine ({cores} cores), all in one run, against a real\n\
         kube-apiserver and etcd (`scripts/kube-apiserver.sh`). Pods, Nodes and ServiceAccounts are created\n\
         through the API with pod status set (no kubelet). One simulated agent per node attests with a join\n\
         token and holds a real mTLS gRPC Sync stream, all from one load process. Churn: {CHURN_PER_SEC}\n\
         pod changes/s for {CHURN_SECS} s (creates and deletes alternating, identities that exist; at most\n\
         2 x pods changes, so every delete removes a distinct pod).\n\
         **current** is this tree; **baseline** is the control plane at `{baseline_rev}` (pods copied into\n\
         one ConfigMap, whole-cluster reconcile and per-node view recomputation), built by\n\
         `scripts/scale-baseline.sh`. Ratios are current / baseline in the same run.\n\n\
         | pods | nodes | identities | build | every node synced after start (s) | after a restart (s) | pod -> agent p50 / p99 (ms) | lost | API writes per pod change | Sync bytes per change: pod's node / each other node | RSS / peak (MiB) | Keyway objects (count, KiB) | etcd in use (MiB) |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    );
    let row = |sc: &Scenario, label: &str, f: &Figures| {
        if f.first_sync.is_none() {
            return format!(
                "| {} | {} | {} | {label} | stopped: {} |||||||||\n",
                sc.pods,
                sc.nodes,
                sc.identities,
                f.stopped.clone().unwrap_or_default().replace('|', "/")
            );
        }
        format!(
            "| {} | {} | {} | {label} | {} | {} | {} / {} | {} | {} | {} / {} | {:.0} / {:.0} | {}, {} | {} |\n",
            sc.pods,
            sc.nodes,
            sc.identities,
            secs(f.first_sync),
            secs(f.cold_start),
            ms(f.p50),
            ms(f.p99),
            f.lost,
            opt(f.writes_per_change, 2),
            opt(f.node_bytes_per_change, 0),
            opt(f.other_bytes_per_change_per_node, 1),
            f.rss_mib,
            f.peak_mib,
            f.objects.0,
            f.objects.1 / 1024,
            opt(f.etcd_mib, 1),
        )
    };
    let mut ratios = String::from(
        "\n## Ratios (current / baseline)\n\n\
         | pods | nodes | identities | RSS | synced after start | p99 | writes per change | bytes to other nodes |\n|---|---|---|---|---|---|---|---|\n",
    );
    for (sc, new, old) in rows {
        md.push_str(&row(sc, "current", new));
        if let Some(old) = old {
            md.push_str(&row(sc, "baseline", old));
            if old.first_sync.is_some() && new.first_sync.is_some() {
                ratios.push_str(&format!(
                    "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
                    sc.pods,
                    sc.nodes,
                    sc.identities,
                    ratio(Some(new.rss_mib), Some(old.rss_mib)),
                    ratio(
                        new.first_sync.map(|d| d.as_secs_f64()),
                        old.first_sync.map(|d| d.as_secs_f64())
                    ),
                    ratio(new.p99.map(|d| d.as_secs_f64()), old.p99.map(|d| d.as_secs_f64())),
                    ratio(new.writes_per_change, old.writes_per_change),
                    ratio(
                        new.other_bytes_per_change_per_node,
                        old.other_bytes_per_change_per_node
                    ),
                ));
            } else {
                ratios.push_str(&format!(
                    "| {} | {} | {} | baseline stopped: no ratio |||||\n",
                    sc.pods, sc.nodes, sc.identities
                ));
            }
        }
    }
    md.push_str(&ratios);
    md.push_str(&format!(
        "\n## Storage while SVIDs rotate\n\n\
         A compressed day: {RETENTION_IDENTITIES} identities renewed every {}s with a 60 s TTL (half-life renewal), the\n\
         issuance log kept 30 s past expiry (`--issuance-keep-after-expiry 30s`), through the admin API. Once the\n\
         window is full, what is held should stay flat. Keyway objects: every ConfigMap and Secret in its namespace\n\
         (bytes as JSON). Log records held: `control-plane issuance list`, which the baseline does not have (-).\n\n\
         | build | after (s) | SVIDs issued | log records held | Keyway objects | KiB | etcd in use (MiB) |\n|---|---|---|---|---|---|---|\n",
        RENEW_EVERY.as_secs()
    ));
    for (label, samples) in [
        ("current", Some(retention_current)),
        ("baseline", retention_baseline),
    ] {
        for h in samples.into_iter().flatten() {
            md.push_str(&format!(
                "| {label} | {:.0} | {} | {} | {} | {} | {} |\n",
                h.at.as_secs_f64(),
                h.issued,
                h.records.map_or("-".to_string(), |r| r.to_string()),
                h.objects,
                h.bytes / 1024,
                opt(h.etcd_mib, 1)
            ));
        }
    }
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench-results");
    std::fs::create_dir_all(&out).expect("results dir");
    let path = out.join("scale.md");
    // The prose after the tables (what the cost is made of) is kept.
    let notes = std::fs::read_to_string(&path).ok().and_then(|t| {
        t.split_once("\n## What the figures are made of")
            .map(|(_, n)| n.to_string())
    });
    if let Some(n) = notes {
        md.push_str("\n## What the figures are made of");
        md.push_str(&n);
    }
    std::fs::write(&path, &md).expect("write results");
    println!("{md}");
}
