//! Shared harness for the workspace integration tests: control planes running
//! in-process on real sockets (TCP on 127.0.0.1, unix sockets in a temp dir),
//! the real binaries, and helpers that wait on events with deadlines instead
//! of sleeping.

pub mod bench;
pub mod helm;
pub mod http;
pub mod kube;
pub mod mesh;
pub mod netns;
pub mod pinned;
pub mod store_contract;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use control_plane::ca::CaConfig;
use control_plane::config::Config;
use control_plane::core::ControlPlane;
use control_plane::store::SledStore;
use keyway_identity::{TrustBundle, TrustDomain, spiffe_id};
use tokio::sync::watch;

pub const TD: &str = "example.org";

pub fn trust_domain() -> TrustDomain {
    spiffe_id::parse_trust_domain(TD).expect("valid trust domain")
}

/// Knobs for an in-process control plane.
#[derive(Debug, Clone)]
pub struct Options {
    pub ca_ttl: Duration,
    pub svid_ttl: Duration,
    pub trust_domain: String,
    pub policy_budget: control_plane::policy::Budget,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            ca_ttl: Duration::from_secs(365 * 86400),
            svid_ttl: Duration::from_secs(3600),
            trust_domain: TD.to_string(),
            policy_budget: Default::default(),
        }
    }
}

#[allow(missing_debug_implementations, reason = "test harness")]
/// A control plane serving its agent API on 127.0.0.1 and its admin API on a
/// unix socket, in this process. Stops when dropped.
pub struct InProcess {
    pub cp: ControlPlane,
    pub addr: String,
    pub admin_socket: PathBuf,
    pub dir: tempfile::TempDir,
    stop: watch::Sender<bool>,
}

impl InProcess {
    pub async fn start(opts: Options) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        Self::start_in(dir, opts).await
    }

    pub async fn start_in(dir: tempfile::TempDir, opts: Options) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let admin_socket = dir.path().join("admin.sock");
        let td = spiffe_id::parse_trust_domain(&opts.trust_domain).expect("valid trust domain");
        let config = Config {
            trust_domain: td.clone(),
            data_dir: dir.path().to_owned(),
            listen: addr,
            admin_socket: admin_socket.clone(),
            svid_ttl: opts.svid_ttl,
            node_svid_ttl: Duration::from_secs(86400).min(opts.ca_ttl / 6),
            jwt_ttl: Duration::from_secs(300),
            ca_ttl: opts.ca_ttl,
            upstream_ca: None,
            kubernetes: false,
            allow_join_tokens: false,
            attest_per_minute: 0,
            agent_api_limits: control_plane::config::agent_api_limits(),
            policy_budget: opts.policy_budget,
            identity_gc_grace: Duration::from_secs(3600),
            issuance_retention: control_plane::store::IssuanceRetention::default(),
        };
        let store = Arc::new(SledStore::open(dir.path()).expect("open store"));
        let ca_cfg = CaConfig {
            trust_domain: td,
            ca_ttl: opts.ca_ttl,
            upstream: None,
        };
        let cp = ControlPlane::open(config, ca_cfg, store)
            .await
            .expect("control plane");
        let (stop, rx) = watch::channel(false);
        tokio::spawn(control_plane::agent_api::serve(cp.clone(), listener, rx.clone()));
        let admin = control_plane::admin::bind(&admin_socket)
            .await
            .expect("admin socket");
        tokio::spawn(control_plane::admin::serve(cp.clone(), admin, rx));
        Self {
            cp,
            addr: addr.to_string(),
            admin_socket,
            dir,
            stop,
        }
    }

    pub fn bundle(&self) -> Arc<TrustBundle> {
        self.cp.authority().bundle()
    }

    /// Stops the servers and returns the data directory for a restart.
    pub fn stop(self) -> tempfile::TempDir {
        let _ = self.stop.send(true);
        self.dir
    }

    pub async fn issuance_count(&self) -> usize {
        self.cp.store().issuance_log().await.expect("issuance log").len()
    }

    pub async fn apply(&self, yaml: &str) {
        self.cp.apply(yaml).await.expect("apply");
    }

    /// An X509-SVID for any ID of this control plane's trust domain, with a
    /// key made here (what `control-plane x509 mint` does).
    pub async fn mint_svid(&self, spiffe_id: &str) -> keyway_identity::Svid {
        let (key, csr) = keyway_identity::csr::generate().expect("key");
        let issued = self
            .cp
            .mint_x509(spiffe_id, &csr, Duration::from_secs(600))
            .await
            .expect("mint");
        keyway_identity::Svid::new(issued.chain, key.serialize_der()).expect("svid")
    }

    pub async fn token(&self, node: &str) -> String {
        self.cp
            .create_join_token(node, Duration::from_secs(600))
            .await
            .expect("token")
            .0
    }
}

/// A `Workload` document.
pub fn workload_yaml(name: &str, sa: &str, node: &str, ip: &str) -> String {
    format!(
        "apiVersion: keyway.dev/v1alpha1\nkind: Workload\nmetadata: {{ name: {name}, namespace: default, labels: {{ app: {name} }} }}\n\
         spec:\n  serviceAccount: {sa}\n  node: {node}\n  ips: [\"{ip}\"]\n  selectors: [\"netns:{name}\"]\n"
    )
}

/// Path of a workspace binary built next to the test executable.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`cargo build --bins`; `make test` does this)",
        path.display()
    );
    path
}

#[allow(missing_debug_implementations, reason = "test harness")]
/// The real `control-plane serve` process. Killed (SIGKILL) on drop.
pub struct Binary {
    pub child: Child,
    pub data_dir: PathBuf,
    pub admin_socket: PathBuf,
    pub listen: String,
}

impl Binary {
    pub fn spawn(data_dir: &Path, extra: &[&str]) -> Self {
        Self::spawn_on(data_dir, &format!("127.0.0.1:{}", free_port()), extra)
    }

    /// Like [`Binary::spawn`] on a given address (to restart in place).
    pub fn spawn_on(data_dir: &Path, listen: &str, extra: &[&str]) -> Self {
        Self::spawn_with(Command::new(bin("control-plane")), data_dir, listen, extra)
    }

    /// Like [`Binary::spawn`], inside network namespace `netns` (only the
    /// network namespace: the filesystem, and so the admin socket, is shared).
    pub fn spawn_in_netns(netns: &str, data_dir: &Path, extra: &[&str]) -> Self {
        Self::spawn_in_netns_on(netns, &format!("127.0.0.1:{}", free_port()), data_dir, extra)
    }

    /// Like [`Binary::spawn_in_netns`] on a given address of that namespace.
    pub fn spawn_in_netns_on(netns: &str, listen: &str, data_dir: &Path, extra: &[&str]) -> Self {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{netns}"))
            .arg("--")
            .arg(bin("control-plane"));
        Self::spawn_with(cmd, data_dir, listen, extra)
    }

    /// Like [`Binary::spawn`] with extra environment (e.g. KUBECONFIG).
    pub fn spawn_env(data_dir: &Path, extra: &[&str], env: &[(&str, &Path)]) -> Self {
        let mut cmd = Command::new(bin("control-plane"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        Self::spawn_with(cmd, data_dir, &format!("127.0.0.1:{}", free_port()), extra)
    }

    fn spawn_with(mut cmd: Command, data_dir: &Path, listen: &str, extra: &[&str]) -> Self {
        let listen = listen.to_owned();
        let admin_socket = data_dir.join("admin.sock");
        // Many control planes run at once: no shared default metrics port
        // unless a test asks for one.
        if !extra.contains(&"--metrics-address") {
            cmd.env("KEYWAY_METRICS_ADDRESS", "off");
        }
        let child = cmd
            .arg("serve")
            .args(["--trust-domain", TD, "--listen", &listen])
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn control-plane");
        let b = Self {
            child,
            data_dir: data_dir.to_owned(),
            admin_socket,
            listen,
        };
        b.wait_ready();
        b
    }

    /// Waits until the admin socket answers (the binary creates it last).
    fn wait_ready(&self) {
        wait_until(Duration::from_secs(30), "control plane admin socket", || {
            std::os::unix::net::UnixStream::connect(&self.admin_socket).is_ok()
        });
    }

    /// Runs a CLI subcommand against this control plane.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(bin("control-plane"))
            .args(args)
            .env("KEYWAY_ADMIN_SOCKET", &self.admin_socket)
            .output()
            .expect("run control-plane")
    }

    /// Runs a CLI subcommand that must succeed; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "control-plane {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8")
    }

    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[allow(missing_debug_implementations, reason = "test harness")]
/// The real `node-agent run` process, attested with a join token from a
/// [`Binary`] control plane. Killed (SIGKILL) on drop.
pub struct AgentBinary {
    pub child: Child,
    /// The Workload API socket.
    pub socket: PathBuf,
    pub admin_socket: PathBuf,
}

impl AgentBinary {
    /// Starts an agent for `node` with its files in `dir` (named after the
    /// node, so several agents can share a directory; no mutual-auth port
    /// unless `extra` asks, no metrics unless `extra` gives an address) and
    /// waits until its `healthcheck` passes.
    pub fn spawn(cp: &Binary, dir: &Path, node: &str, extra: &[&str]) -> Self {
        let token = cp.ok(&["token", "create", "--node", node]).trim().to_owned();
        let bundle = dir.join(format!("{node}-bundle.pem"));
        std::fs::write(&bundle, cp.ok(&["bundle", "show"])).expect("write the bundle");
        let socket = dir.join(format!("{node}.sock"));
        let admin_socket = dir.join(format!("{node}-admin.sock"));
        let mut cmd = Command::new(bin("node-agent"));
        cmd.args([
            "run",
            "--server",
            &cp.listen,
            "--trust-domain",
            TD,
            "--node-name",
            node,
        ])
        .arg("--trust-bundle")
        .arg(&bundle)
        .arg("--data-dir")
        .arg(dir.join(format!("{node}-data")))
        .arg("--socket")
        .arg(&socket)
        .arg("--admin-socket")
        .arg(&admin_socket);
        if !extra.contains(&"--auth-port") {
            cmd.args(["--auth-port", "0"]);
        }
        if !extra.contains(&"--metrics-address") {
            cmd.args(["--metrics-address", "off"]);
        }
        let child = cmd
            .args(extra)
            .env("KEYWAY_JOIN_TOKEN", token)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn node-agent");
        let agent = Self {
            child,
            socket,
            admin_socket,
        };
        wait_until(Duration::from_secs(30), "agent healthy", || {
            Command::new(bin("node-agent"))
                .args(["healthcheck", "--socket"])
                .arg(&agent.socket)
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false)
        });
        agent
    }
}

impl AgentBinary {
    /// `node-agent svid fetch -o json` on this agent's socket, run as `uid`
    /// (and group `uid`, no supplementary groups), in network namespace
    /// `netns` if given: a workload as the Workload API sees it.
    pub fn fetch_svid_as(&self, uid: u32, netns: Option<&str>) -> std::process::Output {
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "setpriv"]);
                c
            }
            None => Command::new("setpriv"),
        };
        cmd.args([
            format!("--reuid={uid}"),
            format!("--regid={uid}"),
            "--clear-groups".into(),
        ])
        .arg("--")
        .arg(bin("node-agent"))
        .args(["svid", "fetch", "-o", "json", "--socket"])
        .arg(&self.socket)
        .output()
        .expect("run node-agent svid fetch")
    }
}

impl Drop for AgentBinary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Polls `cond` until it holds, failing the test after `deadline`.
pub fn wait_until(deadline: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        std::thread::yield_now();
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs openssl; returns (success, combined output).
pub fn openssl(args: &[&str]) -> (bool, String) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl is installed (scripts/setup.sh)");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A node agent running in this process: attested to `cp`, serving the
/// Workload API on a socket in its own temp dir. Stops when dropped.
#[allow(missing_debug_implementations, reason = "test harness")]
pub struct Agent {
    pub handles: node_agent::agent::AgentHandles,
    server: tokio::task::JoinHandle<()>,
    pub socket: PathBuf,
    pub data_dir: PathBuf,
    pub dir: tempfile::TempDir,
    stop: watch::Sender<bool>,
}

impl Agent {
    /// Starts an agent for `node`, attesting with a fresh join token unless
    /// `dir` already holds a node SVID.
    pub async fn start(cp: &InProcess, node: &str, dir: Option<tempfile::TempDir>) -> Self {
        let token = cp.token(node).await;
        Self::start_with(&cp.addr, &cp.bundle().to_pem(), node, Some(token), dir).await
    }

    pub async fn start_with(
        server: &str,
        bundle_pem: &str,
        node: &str,
        token: Option<String>,
        dir: Option<tempfile::TempDir>,
    ) -> Self {
        Self::start_full(server, bundle_pem, node, token, dir, Vec::new()).await
    }

    /// Like [`Agent::start_with`], advertising mutual-auth addresses.
    pub async fn start_full(
        server: &str,
        bundle_pem: &str,
        node: &str,
        token: Option<String>,
        dir: Option<tempfile::TempDir>,
        auth_addresses: Vec<String>,
    ) -> Self {
        Self::start_attesting(server, bundle_pem, node, token, None, dir, auth_addresses).await
    }

    /// Starts an agent that attests with a Kubernetes service account token
    /// (the projected token file a DaemonSet would mount).
    pub async fn start_kubernetes(server: &str, bundle_pem: &str, node: &str, token_file: PathBuf) -> Self {
        Self::start_attesting(server, bundle_pem, node, None, Some(token_file), None, Vec::new()).await
    }

    /// Like [`Agent::start_kubernetes`] on the data in `dir` (an earlier
    /// agent's), returning the agent's start-up error instead of panicking.
    pub async fn try_start_kubernetes(
        server: &str,
        bundle_pem: &str,
        node: &str,
        token_file: PathBuf,
        dir: tempfile::TempDir,
    ) -> Result<Self, node_agent::agent::AgentError> {
        Self::try_start_attesting(
            server,
            bundle_pem,
            node,
            None,
            Some(token_file),
            Some(dir),
            Vec::new(),
        )
        .await
    }

    async fn start_attesting(
        server: &str,
        bundle_pem: &str,
        node: &str,
        token: Option<String>,
        k8s_token_file: Option<PathBuf>,
        dir: Option<tempfile::TempDir>,
        auth_addresses: Vec<String>,
    ) -> Self {
        Self::try_start_attesting(
            server,
            bundle_pem,
            node,
            token,
            k8s_token_file,
            dir,
            auth_addresses,
        )
        .await
        .expect("agent start")
    }

    async fn try_start_attesting(
        server: &str,
        bundle_pem: &str,
        node: &str,
        token: Option<String>,
        k8s_token_file: Option<PathBuf>,
        dir: Option<tempfile::TempDir>,
        auth_addresses: Vec<String>,
    ) -> Result<Self, node_agent::agent::AgentError> {
        let dir = dir.unwrap_or_else(|| tempfile::tempdir().expect("temp dir"));
        let bundle_path = dir.path().join("trust-bundle.pem");
        std::fs::write(&bundle_path, bundle_pem).expect("write bundle");
        let cfg = node_agent::agent::AgentConfig {
            server: server.to_owned(),
            trust_domain: trust_domain(),
            trust_bundle: bundle_path,
            node_name: node.to_owned(),
            data_dir: dir.path().join("data"),
            join_token: token,
            k8s_token_file,
            socket: dir.path().join("agent.sock"),
            netns_dir: dir.path().join("netns"),
            proc_root: PathBuf::from("/proc"),
            auth_addresses,
            workload_api_limits: node_agent::workload_api::limits(),
        };
        let (stop, rx) = watch::channel(false);
        let handles = node_agent::agent::start(cfg.clone(), rx.clone()).await?;
        let metrics = node_agent::workload_api::StreamMetrics::register(
            &handles.telemetry.registry,
            handles.telemetry.listeners.clone(),
        );
        let server =
            node_agent::workload_api::start(&cfg, &handles, metrics, rx).expect("serve the workload API");
        Ok(Self {
            handles,
            server,
            socket: cfg.socket,
            data_dir: cfg.data_dir,
            dir,
            stop,
        })
    }

    /// `unix:///...` endpoint for SPIFFE clients.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// Waits until the agent holds an SVID for `spiffe_id`.
    pub async fn wait_for_svid(&self, spiffe_id: &str) {
        let mut rx = self.handles.svids.clone();
        tokio::time::timeout(
            Duration::from_secs(20),
            rx.wait_for(|s| s.contains_key(spiffe_id)),
        )
        .await
        .unwrap_or_else(|_| panic!("no SVID for {spiffe_id} within 20s"))
        .expect("agent running");
    }

    /// Stops the agent and waits for its socket to close, keeping its
    /// directory for a restart.
    pub async fn stop(self) -> tempfile::TempDir {
        let _ = self.stop.send(true);
        let mut server = self.server;
        if tokio::time::timeout(Duration::from_secs(5), &mut server)
            .await
            .is_err()
        {
            // A client still holds a stream: cut it off, and wait until the
            // task (and with it the listening socket) is really gone, or an
            // agent restarted on this directory finds the socket in use.
            server.abort();
            let _ = server.await;
        }
        // A process another test forked in the meantime holds a copy of the
        // listening socket until it execs: wait until nothing answers, or an
        // agent restarted on this directory finds the socket in use.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} still answers 10 s after the agent stopped",
                self.socket.display()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.dir
    }
}

macro_rules! mtls_ingress {
    () => {
        "apiVersion: keyway.dev/v1alpha1
kind: KeywayNetworkPolicy
metadata: { name: api-mtls, namespace: default }
spec:
  endpointSelector: { matchLabels: { app: api } }
  ingress:
    - authentication: { mode: required }
      fromEndpoints: [{ matchLabels: { app: frontend } }]
      toPorts: [{ ports: [{ port: \"8080\", protocol: TCP }] }]
"
    };
}

/// api (app=api) accepts frontend (app=frontend) on TCP 8080 only when the
/// pair is mutually authenticated.
pub const MTLS_INGRESS: &str = mtls_ingress!();

/// [`MTLS_INGRESS`], and frontend's egress to api under the same rule.
pub const MTLS_BOTH_WAYS: &str = concat!(
    mtls_ingress!(),
    "---
apiVersion: keyway.dev/v1alpha1
kind: KeywayNetworkPolicy
metadata: { name: frontend-mtls, namespace: default }
spec:
  endpointSelector: { matchLabels: { app: frontend } }
  egress:
    - authentication: { mode: required }
      toEndpoints: [{ matchLabels: { app: api } }]
      toPorts: [{ ports: [{ port: \"8080\", protocol: TCP }] }]
"
);

/// A Workload document whose selector matches this test process (by uid).
pub fn workload_for_me(name: &str, sa: &str, node: &str, ttl: Option<&str>) -> String {
    let uid = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .unwrap_or(0);
    let ttl = ttl.map(|t| format!("  svidTTL: {t}\n")).unwrap_or_default();
    format!(
        "apiVersion: keyway.dev/v1alpha1\nkind: Workload\nmetadata: {{ name: {name}, namespace: default }}\n\
         spec:\n  serviceAccount: {sa}\n  node: {node}\n  selectors: [\"unix:uid:{uid}\"]\n{ttl}"
    )
}

/// A raw Workload API client on `socket` that adds no metadata, so tests can
/// send requests with and without the security header.
pub async fn raw_workload_client(
    socket: &Path,
) -> Result<
    proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient<tonic::transport::Channel>,
    tonic::transport::Error,
> {
    let path = socket.to_owned();
    let channel = tonic::transport::Endpoint::from_static("http://agent")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await?;
    Ok(proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(channel))
}

/// A request carrying the Workload API security header (EP-03).
pub fn with_security_header<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(
        "workload.spiffe.io",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    r
}

/// Resident set size of a process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or_else(|| panic!("no VmRSS for pid {pid}"))
}
