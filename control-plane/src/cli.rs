//! The `control-plane` command line (DESIGN.md section 9). `serve` runs the
//! server; every other subcommand is a client of the admin socket.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use proto::keyway as pb;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::ca::{CaConfig, Upstream};
use crate::config::{Config, UpstreamFiles, duration_flag};
use crate::core::ControlPlane;
use crate::store::SledStore;

const DEFAULT_DATA_DIR: &str = "/var/lib/keyway/control-plane";

#[derive(Debug, Parser)]
#[command(
    name = "control-plane",
    version,
    about = "Keyway control plane: SPIFFE CA, identities and policy"
)]
pub struct Cli {
    /// The admin socket of a running control plane (default: DATA_DIR/admin.sock).
    #[arg(long, global = true, env = "KEYWAY_ADMIN_SOCKET")]
    pub admin_socket: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the control plane.
    Serve(Box<ServeArgs>),
    /// Join tokens for node attestation.
    #[command(subcommand)]
    Token(TokenCommand),
    /// The trust bundle.
    #[command(subcommand)]
    Bundle(BundleCommand),
    /// Mint an X509-SVID for an operator (key generated locally).
    #[command(subcommand)]
    X509(X509Command),
    /// Mint a JWT-SVID for an operator.
    #[command(subcommand)]
    Jwt(JwtCommand),
    /// CA status and manual two-phase rotation.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Apply Workload and KeywayNetworkPolicy documents from a YAML file (all or nothing).
    Apply {
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// Delete the Workload and KeywayNetworkPolicy documents a YAML file names
    /// (by kind, namespace and name; all or nothing). Numeric identities stay
    /// allocated: applying the same workload again gives it the same one.
    Delete {
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// Numeric identities.
    #[command(subcommand)]
    Identity(IdentityCommand),
    /// Attested nodes.
    #[command(subcommand)]
    Node(NodeCommand),
    /// The issuance log (within its retention window).
    #[command(subcommand)]
    Issuance(IssuanceCommand),
    /// Print the KeywayNetworkPolicy CustomResourceDefinition (YAML), as
    /// generated from the Rust types and committed in the Helm chart.
    Crd,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[arg(long, env = "KEYWAY_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    #[arg(long, env = "KEYWAY_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// Agent API address (TLS).
    #[arg(long, env = "KEYWAY_LISTEN", default_value = "0.0.0.0:8081")]
    pub listen: String,
    /// Default workload X509-SVID lifetime.
    #[arg(long, default_value = "1h")]
    pub svid_ttl: String,
    #[arg(long, default_value = "24h")]
    pub node_svid_ttl: String,
    #[arg(long, default_value = "5m")]
    pub jwt_ttl: String,
    /// Lifetime of each signing CA (rotation runs at 1/2 and 5/6 of it).
    #[arg(long, default_value = "365d")]
    pub ca_ttl: String,
    /// Watch a Kubernetes cluster for workloads and policy (in-cluster
    /// config, or KUBECONFIG), and accept service account token attestation.
    #[arg(long)]
    pub kubernetes: bool,
    /// Where durable state lives: `sled` (embedded, in --data-dir; one
    /// replica) or `kubernetes` (a Secret and ConfigMaps in --namespace;
    /// several replicas with Lease leader election; needs --kubernetes).
    #[arg(long, value_enum, env = "KEYWAY_STORE", default_value = "sled")]
    pub store: StoreKind,
    /// Kubernetes mode: the namespace of the control plane's own objects
    /// (CA Secret, state ConfigMaps, Lease, the keyway-bundle ConfigMap).
    #[arg(long, env = "POD_NAMESPACE", default_value = "keyway-system")]
    pub namespace: String,
    /// Kubernetes mode: this replica's name in the Lease (default: the host name).
    #[arg(long, env = "POD_NAME")]
    pub holder_identity: Option<String>,
    /// Kubernetes mode: the node agent's service account, NAMESPACE/NAME;
    /// only its pods' tokens attest nodes.
    #[arg(
        long,
        env = "KEYWAY_AGENT_SERVICE_ACCOUNT",
        default_value = "keyway-system/keyway-node-agent"
    )]
    pub agent_service_account: String,
    /// Kubernetes mode with replicas: the Lease they elect a leader with.
    #[arg(long, default_value = "keyway-control-plane")]
    pub lease_name: String,
    /// Sign as an intermediate of this upstream CA (PEM; its chain may follow).
    #[arg(long, requires = "upstream_ca_key")]
    pub upstream_ca_cert: Option<PathBuf>,
    #[arg(long, requires = "upstream_ca_cert")]
    pub upstream_ca_key: Option<PathBuf>,
    /// Serve Prometheus `/metrics`, `/healthz` and `/readyz` over plain HTTP
    /// on HOST:PORT, or `off`.
    #[arg(long, env = "KEYWAY_METRICS_ADDRESS", default_value = "127.0.0.1:9090")]
    pub metrics_address: String,
    /// Kubernetes mode: accept join-token attestation too (agents there
    /// attest with projected service account tokens; join tokens are off).
    #[arg(long, env = "KEYWAY_ALLOW_JOIN_TOKENS")]
    pub allow_join_tokens: bool,
    /// Attestation attempts a minute from one source address (IPv6: one
    /// /64), in bursts of a sixth of that; 0 turns the limit off.
    #[arg(long, default_value_t = 60)]
    pub attest_per_minute: u32,
    /// Connections the agent API holds at once.
    #[arg(long, default_value_t = crate::config::agent_api_limits().max_connections)]
    pub max_connections: usize,
    /// Connections the agent API holds at once from one source address.
    #[arg(long, default_value_t = crate::config::agent_api_limits().max_per_peer)]
    pub max_connections_per_peer: usize,
    /// Datapath entries one policy may compile to (subjects x peers x
    /// 256-port blocks); a policy over it is refused and says why.
    #[arg(long, default_value_t = crate::policy::Budget::default().per_policy)]
    pub policy_entries_per_policy: usize,
    /// Datapath entries the policies of one namespace may compile to together.
    #[arg(long, default_value_t = crate::policy::Budget::default().per_namespace)]
    pub policy_entries_per_namespace: usize,
    /// How long a numeric identity that no workload uses is kept before it
    /// is forgotten (its number is never handed out again).
    #[arg(long, default_value = "1h")]
    pub identity_gc_grace: String,
    /// The issuance log keeps a record while its certificate is valid and
    /// this long after it expired (so the window follows the longest TTL).
    #[arg(long, default_value = "1h")]
    pub issuance_keep_after_expiry: String,
    /// ... and at most this many records (those expiring first go first).
    #[arg(long, default_value_t = crate::store::IssuanceRetention::default().max_records)]
    pub issuance_max_records: usize,
    /// ... and at most this many MiB of records.
    #[arg(long, default_value_t = crate::store::IssuanceRetention::default().max_bytes >> 20)]
    pub issuance_max_mib: usize,
}

/// `--metrics-address`: HOST:PORT, or `off`.
pub fn metrics_address_flag(v: &str) -> anyhow::Result<Option<std::net::SocketAddr>> {
    if v == "off" {
        return Ok(None);
    }
    v.parse().map(Some).map_err(|_| {
        anyhow::anyhow!("--metrics-address: {v:?} is not HOST:PORT (e.g. 127.0.0.1:9090) or `off`")
    })
}

/// Binds the metrics listener and serves it until `shutdown`; a taken
/// address is a start-up error naming the flag.
pub async fn start_metrics(
    address: Option<std::net::SocketAddr>,
    metrics: &crate::metrics::Metrics,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    let Some(address) = address else {
        return Ok(None);
    };
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("--metrics-address: cannot bind {address}"))?;
    let bound = listener.local_addr()?;
    info!(metrics_address = %bound, "metrics and health endpoints listening");
    let gate = keyway_serve::Gate::new("metrics", keyway_serve::http::limits(), metrics.listeners.clone());
    Ok(Some(tokio::spawn(keyway_serve::http::serve(
        listener,
        gate,
        metrics.registry.clone(),
        metrics.readiness.clone(),
        shutdown,
    ))))
}

/// Where the control plane keeps its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StoreKind {
    Sled,
    Kubernetes,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Print a single-use join token for a node.
    Create {
        #[arg(long)]
        node: String,
        #[arg(long, default_value = "10m")]
        ttl: String,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum BundleFormat {
    Pem,
    Jwks,
}

#[derive(Debug, Subcommand)]
pub enum BundleCommand {
    Show {
        #[arg(long, value_enum, default_value = "pem")]
        format: BundleFormat,
    },
}

#[derive(Debug, Subcommand)]
pub enum X509Command {
    /// Writes svid.pem, key.pem and bundle.pem into --out.
    Mint {
        #[arg(long)]
        spiffe_id: String,
        #[arg(long, default_value = "1h")]
        ttl: String,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum JwtCommand {
    Mint {
        #[arg(long)]
        spiffe_id: String,
        #[arg(long, required = true)]
        audience: Vec<String>,
        #[arg(long, default_value = "5m")]
        ttl: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    Status,
    Prepare,
    Activate,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Revoke a node: its SVID stops working (renewal included), its Sync
    /// stream ends and every agent flushes the auth entries it vouched for.
    /// Attesting again (a new join token) starts a new registration.
    Revoke { name: String },
}

#[derive(Debug, Subcommand)]
pub enum IssuanceCommand {
    /// Certificates issued, newest first: serial, SPIFFE ID, requester,
    /// authority and validity. The log keeps what `serve
    /// --issuance-keep-after-expiry/--issuance-max-*` allow.
    List {
        /// Only certificates for this SPIFFE ID.
        #[arg(long)]
        spiffe_id: Option<String>,
        /// Only certificates this node (or `admin`, `control-plane`) asked for.
        #[arg(long)]
        requester: Option<String>,
        /// Only the certificate with this serial (hex).
        #[arg(long)]
        serial: Option<String>,
        /// At most this many (at most 10000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
pub enum IdentityCommand {
    List {
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
    },
}

impl ServeArgs {
    fn config(&self, admin_socket: Option<PathBuf>) -> anyhow::Result<Config> {
        let trust_domain = keyway_identity::spiffe_id::parse_trust_domain(&self.trust_domain)
            .map_err(|e| anyhow::anyhow!("--trust-domain: {e}"))?;
        let listen = self.listen.parse().map_err(|_| {
            anyhow::anyhow!("--listen: {:?} is not HOST:PORT (e.g. 0.0.0.0:8081)", self.listen)
        })?;
        let d = |flag, v: &String| duration_flag(flag, v).map_err(anyhow::Error::msg);
        let config = Config {
            trust_domain,
            admin_socket: admin_socket.unwrap_or_else(|| self.data_dir.join("admin.sock")),
            data_dir: self.data_dir.clone(),
            listen,
            svid_ttl: d("svid-ttl", &self.svid_ttl)?,
            node_svid_ttl: d("node-svid-ttl", &self.node_svid_ttl)?,
            jwt_ttl: d("jwt-ttl", &self.jwt_ttl)?,
            ca_ttl: d("ca-ttl", &self.ca_ttl)?,
            upstream_ca: match (&self.upstream_ca_cert, &self.upstream_ca_key) {
                (Some(cert), Some(key)) => Some(UpstreamFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                }),
                _ => None,
            },
            kubernetes: self.kubernetes,
            allow_join_tokens: self.allow_join_tokens,
            attest_per_minute: self.attest_per_minute,
            agent_api_limits: keyway_serve::Limits {
                max_connections: self.max_connections,
                max_per_peer: self.max_connections_per_peer,
                ..crate::config::agent_api_limits()
            },
            policy_budget: crate::policy::Budget {
                per_policy: self.policy_entries_per_policy,
                per_namespace: self.policy_entries_per_namespace,
            },
            identity_gc_grace: d("identity-gc-grace", &self.identity_gc_grace)?,
            issuance_retention: crate::store::IssuanceRetention {
                after_expiry: d("issuance-keep-after-expiry", &self.issuance_keep_after_expiry)?,
                max_records: self.issuance_max_records,
                max_bytes: self.issuance_max_mib.saturating_mul(1 << 20),
            },
        };
        if config.issuance_retention.max_records == 0 || config.issuance_retention.max_bytes == 0 {
            bail!("--issuance-max-records and --issuance-max-mib must be at least 1");
        }
        if config.max_connections_zero() {
            bail!("--max-connections and --max-connections-per-peer must be at least 1");
        }
        if config.ca_ttl < Duration::from_secs(6) {
            bail!("--ca-ttl: must be at least 6s");
        }
        Ok(config)
    }
}

fn load_upstream(files: &UpstreamFiles) -> anyhow::Result<Upstream> {
    let cert_pem = std::fs::read_to_string(&files.cert)
        .with_context(|| format!("--upstream-ca-cert: cannot read {}", files.cert.display()))?;
    let chain = keyway_identity::pem::decode_certs(&cert_pem)
        .map_err(|e| anyhow::anyhow!("--upstream-ca-cert {}: {e}", files.cert.display()))?;
    let key_pem = std::fs::read_to_string(&files.key)
        .with_context(|| format!("--upstream-ca-key: cannot read {}", files.key.display()))?;
    let key = rcgen::KeyPair::from_pem(&key_pem)
        .map_err(|e| anyhow::anyhow!("--upstream-ca-key {}: {e}", files.key.display()))?;
    let cert =
        keyway_identity::x509::parse(&chain[0]).map_err(|e| anyhow::anyhow!("--upstream-ca-cert: {e}"))?;
    if cert.public_key().subject_public_key.data.as_ref() != rcgen::PublicKeyData::der_bytes(&key) {
        bail!("--upstream-ca-key does not belong to the first certificate in --upstream-ca-cert");
    }
    match cert.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => {}
        _ => bail!("--upstream-ca-cert: the first certificate is not a CA (basicConstraints cA=true)"),
    }
    Ok(Upstream { chain, key })
}

/// Creates the data directory with mode 0700 (it holds CA keys), makes
/// everything already in it owner-only (files 0600, directories 0700: a
/// store written by an earlier version may have 0644 files), and sets the
/// process umask to 0077 so every file the store creates from now on, its
/// snapshots included, is owner-only from the start.
fn prepare_data_dir(dir: &Path) -> anyhow::Result<()> {
    set_private_umask();
    std::fs::create_dir_all(dir).with_context(|| format!("--data-dir: cannot create {}", dir.display()))?;
    restrict_tree(dir)
        .with_context(|| format!("--data-dir: cannot restrict {} to its owner", dir.display()))?;
    Ok(())
}

#[allow(unsafe_code, reason = "umask(2) has no std equivalent")]
fn set_private_umask() {
    // SAFETY: umask only swaps the process's file creation mask.
    unsafe {
        libc::umask(0o077);
    }
}

/// Files 0600 and directories 0700 under `dir` (symlinks are not followed).
///
/// What this process does not own is left as it is: a Kubernetes emptyDir
/// given to a non-root control plane is root's (group `fsGroup`, mode 0777)
/// and cannot be changed; only the pod's containers see it, and every file
/// in it is still owner-only.
fn restrict_tree(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    // SAFETY: geteuid has no preconditions and cannot fail.
    #[allow(unsafe_code, reason = "geteuid(2) has no std equivalent")]
    let me = unsafe { libc::geteuid() };
    let meta = std::fs::symlink_metadata(dir)?;
    if meta.uid() == me {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    } else if meta.permissions().mode() & 0o077 != 0 {
        warn!(
            path = %dir.display(),
            owner = meta.uid(),
            mode = format!("{:o}", meta.permissions().mode() & 0o7777),
            "the data directory is not ours to restrict; the files in it are owner-only"
        );
    }
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            restrict_tree(&entry.path())?;
        } else if kind.is_file() {
            let meta = entry.metadata()?;
            let mode = meta.permissions().mode();
            if mode & 0o077 != 0 && meta.uid() == me {
                std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(mode & 0o700))?;
            }
        }
    }
    Ok(())
}

async fn serve(args: ServeArgs, admin_socket: Option<PathBuf>) -> anyhow::Result<()> {
    let config = args.config(admin_socket)?;
    if args.store == StoreKind::Kubernetes && !config.kubernetes {
        bail!("--store kubernetes needs --kubernetes (the state lives in the cluster)");
    }
    let effective = config.effective_svid_ttl(config.svid_ttl);
    if effective < config.svid_ttl {
        warn!(
            requested = %keyway_identity::duration::format(config.svid_ttl),
            capped = %keyway_identity::duration::format(effective),
            "--svid-ttl capped at 1/6 of --ca-ttl so CA rotation never outlives an SVID"
        );
    }
    let metrics_address = metrics_address_flag(&args.metrics_address)?;
    keyway_serve::raise_open_files_limit();
    prepare_data_dir(&config.data_dir)?;
    let upstream = config.upstream_ca.as_ref().map(load_upstream).transpose()?;
    let metrics = crate::metrics::Metrics::default();
    if config.kubernetes {
        metrics.readiness.expect(crate::metrics::READY_KUBERNETES_CACHES);
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let metrics_server = start_metrics(metrics_address, &metrics, stop_rx.clone()).await?;
    info!(
        trust_domain = %config.trust_domain,
        data_dir = %config.data_dir.display(),
        listen = %config.listen,
        admin_socket = %config.admin_socket.display(),
        svid_ttl = %keyway_identity::duration::format(effective),
        ca_ttl = %keyway_identity::duration::format(config.ca_ttl),
        upstream = upstream.is_some(),
        "starting control plane"
    );
    let kube_client = if config.kubernetes {
        Some(kube::Client::try_default().await.map_err(|e| {
            anyhow::anyhow!(
                "--kubernetes: cannot build a Kubernetes client (no in-cluster service account and no usable KUBECONFIG): {e}"
            )
        })?)
    } else {
        None
    };
    let holder = args
        .holder_identity
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("control-plane-{}", std::process::id()));
    let store: Arc<dyn crate::store::Store> = match (args.store, &kube_client) {
        (StoreKind::Kubernetes, Some(client)) => Arc::new(
            crate::store::KubeStore::open(client.clone(), &args.namespace, &holder)
                .await
                .map_err(|e| anyhow::anyhow!("--store kubernetes: {e}"))?,
        ),
        _ => Arc::new(SledStore::open(&config.data_dir)?),
    };
    metrics.readiness.set_ready(crate::metrics::READY_STORE);
    let ca_cfg = CaConfig {
        trust_domain: config.trust_domain.clone(),
        ca_ttl: config.ca_ttl,
        upstream,
    };
    let cp = ControlPlane::open_with_metrics(config.clone(), ca_cfg, store, metrics).await?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("--listen: cannot bind {}", config.listen))?;
    let admin_listener = crate::admin::bind(&config.admin_socket).await?;
    let agent = tokio::spawn(crate::agent_api::serve(cp.clone(), listener, stop_rx.clone()));
    let admin = tokio::spawn(crate::admin::serve(cp.clone(), admin_listener, stop_rx.clone()));
    let schedule = tokio::spawn({
        let cp = cp.clone();
        let rx = stop_rx.clone();
        async move { cp.run_schedule(rx).await }
    });
    let identity_gc = tokio::spawn({
        let cp = cp.clone();
        let rx = stop_rx.clone();
        async move { cp.run_identity_gc(rx).await }
    });
    let issuance_retention = tokio::spawn({
        let cp = cp.clone();
        let rx = stop_rx.clone();
        async move { cp.run_issuance_retention(rx).await }
    });
    let kubernetes = match kube_client {
        Some(client) => {
            let k8s = crate::kubernetes::Options {
                namespace: args.namespace.clone(),
                holder_identity: holder.clone(),
                agent_service_account: args.agent_service_account.clone(),
                lease_name: args.lease_name.clone(),
                replicas: args.store == StoreKind::Kubernetes,
            };
            Some(
                crate::kubernetes::start(cp.clone(), client, k8s, stop_rx.clone())
                    .map_err(anyhow::Error::msg)?,
            )
        }
        None => None,
    };
    info!(listen = %config.listen, "control plane ready");
    wait_for_signal().await;
    info!("shutting down: draining connections (10s deadline)");
    let _ = stop_tx.send(true);
    let drain = async {
        if let Ok(Err(e)) = agent.await {
            error!(error = %e, "agent API stopped with an error");
        }
        let _ = admin.await;
        let _ = schedule.await;
        let _ = identity_gc.await;
        let _ = issuance_retention.await;
        if let Some(k8s) = kubernetes {
            k8s.await;
        }
        if let Some(m) = metrics_server {
            let _ = m.await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(10), drain)
        .await
        .is_err()
    {
        warn!("drain deadline passed; stopping anyway");
    }
    let _ = std::fs::remove_file(&config.admin_socket);
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn status_error(e: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{} ({:?})", e.message(), e.code())
}

/// A client of the admin socket named by the flag or env, or the default.
async fn admin(
    socket: Option<PathBuf>,
) -> anyhow::Result<pb::admin_client::AdminClient<tonic::transport::Channel>> {
    let path = socket.unwrap_or_else(|| Path::new(DEFAULT_DATA_DIR).join("admin.sock"));
    crate::admin::connect(&path).await.map_err(anyhow::Error::msg)
}

fn format_time(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| unix.to_string())
}

#[derive(Debug, Clone, Copy)]
enum Documents {
    Apply,
    Delete,
}

/// `apply -f` / `delete -f`: sends the file and prints what changed, one
/// line per document.
async fn documents(socket: Option<PathBuf>, file: &Path, op: Documents) -> anyhow::Result<()> {
    let yaml =
        std::fs::read_to_string(file).with_context(|| format!("-f: cannot read {}", file.display()))?;
    let mut c = admin(socket).await?;
    let req = pb::ApplyRequest { yaml };
    let r = match op {
        Documents::Apply => c.apply(req).await,
        Documents::Delete => c.delete(req).await,
    }
    .map_err(|e| anyhow::anyhow!("{}: {}", file.display(), e.message()))?
    .into_inner();
    for change in r.changes {
        println!("{change}");
    }
    Ok(())
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let socket = cli.admin_socket.clone();
    match cli.command {
        Command::Serve(args) => serve(*args, socket).await,
        Command::Token(TokenCommand::Create { node, ttl }) => {
            let ttl = duration_flag("ttl", &ttl).map_err(anyhow::Error::msg)?;
            let mut c = admin(socket).await?;
            let r = c
                .create_join_token(pb::CreateJoinTokenRequest {
                    node_name: node,
                    ttl_seconds: ttl.as_secs(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            println!("{}", r.token);
            Ok(())
        }
        Command::Bundle(BundleCommand::Show { format }) => {
            let mut c = admin(socket).await?;
            let b = c
                .get_bundle(pb::GetBundleRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            match format {
                BundleFormat::Pem => print!(
                    "{}",
                    keyway_identity::pem::encode_certs(b.x509_authorities.iter().map(|c| c.as_slice()))
                ),
                BundleFormat::Jwks => println!("{}", String::from_utf8_lossy(&b.jwks)),
            }
            Ok(())
        }
        Command::X509(X509Command::Mint { spiffe_id, ttl, out }) => {
            let ttl = duration_flag("ttl", &ttl).map_err(anyhow::Error::msg)?;
            // The key is made here and never sent anywhere: only the CSR is.
            let (key, csr) = keyway_identity::csr::generate()?;
            let mut c = admin(socket).await?;
            let r = c
                .mint_x509_svid(pb::MintX509SvidRequest {
                    spiffe_id,
                    csr,
                    ttl_seconds: ttl.as_secs(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            let bundle = r.bundle.unwrap_or_default();
            keyway_identity::pem::write_svid_dir(
                &out,
                &r.cert_chain,
                &key.serialize_der(),
                &bundle.x509_authorities,
            )
            .with_context(|| format!("--out: cannot write to {}", out.display()))?;
            println!("wrote {0}/svid.pem {0}/key.pem {0}/bundle.pem", out.display());
            Ok(())
        }
        Command::Jwt(JwtCommand::Mint {
            spiffe_id,
            audience,
            ttl,
        }) => {
            let ttl = duration_flag("ttl", &ttl).map_err(anyhow::Error::msg)?;
            let mut c = admin(socket).await?;
            let r = c
                .mint_jwt_svid(pb::MintJwtSvidRequest {
                    spiffe_id,
                    audience,
                    ttl_seconds: ttl.as_secs(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            println!("{}", r.token);
            Ok(())
        }
        Command::Ca(cmd) => {
            let mut c = admin(socket).await?;
            let req = pb::CaStatusRequest {};
            let status = match cmd {
                CaCommand::Status => c.ca_status(req).await,
                CaCommand::Prepare => c.ca_prepare(req).await,
                CaCommand::Activate => c.ca_activate(req).await,
            }
            .map_err(status_error)?
            .into_inner();
            println!("bundle sequence: {}", status.bundle_sequence);
            println!(
                "{:<18} {:<9} {:<22} {:<22} JWT KID",
                "ID", "STATE", "NOT BEFORE", "NOT AFTER"
            );
            for a in &status.authorities {
                println!(
                    "{:<18} {:<9} {:<22} {:<22} {}",
                    a.id,
                    a.state,
                    format_time(a.not_before_unix),
                    format_time(a.not_after_unix),
                    a.jwt_key_id
                );
            }
            if !status.next_step.is_empty() {
                println!(
                    "next step: {} at {}",
                    status.next_step,
                    format_time(status.next_step_at_unix)
                );
            }
            Ok(())
        }
        Command::Apply { file } => documents(socket, &file, Documents::Apply).await,
        Command::Delete { file } => documents(socket, &file, Documents::Delete).await,
        Command::Crd => {
            print!("{}", crate::crd::crd_yaml());
            Ok(())
        }
        Command::Node(NodeCommand::Revoke { name }) => {
            let mut c = admin(socket).await?;
            c.revoke_node(pb::RevokeNodeRequest {
                node_name: name.clone(),
            })
            .await
            .map_err(status_error)?;
            println!("node {name} revoked");
            Ok(())
        }
        Command::Issuance(IssuanceCommand::List {
            spiffe_id,
            requester,
            serial,
            limit,
            output,
        }) => {
            let mut c = admin(socket).await?;
            let r = c
                .list_issuance(pb::ListIssuanceRequest {
                    spiffe_id: spiffe_id.unwrap_or_default(),
                    requester: requester.unwrap_or_default(),
                    serial: serial.unwrap_or_default(),
                    limit,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            match output {
                Output::Json => {
                    for e in &r.records {
                        println!(
                            "{}",
                            serde_json::json!({
                                "serial": e.serial,
                                "spiffe_id": e.spiffe_id,
                                "requester": e.requester,
                                "ca_id": e.ca_id,
                                "issued_at": e.issued_at,
                                "not_after": e.not_after,
                            })
                        );
                    }
                }
                Output::Table => {
                    println!(
                        "{:<40} {:<20} {:<20} {:<20} {:<16} SPIFFE ID",
                        "SERIAL", "ISSUED", "NOT AFTER", "REQUESTER", "CA"
                    );
                    for e in &r.records {
                        println!(
                            "{:<40} {:<20} {:<20} {:<20} {:<16} {}",
                            e.serial,
                            format_time(e.issued_at),
                            format_time(e.not_after),
                            e.requester,
                            e.ca_id,
                            e.spiffe_id
                        );
                    }
                    eprintln!(
                        "{} shown, {} matched, {} held in the log",
                        r.records.len(),
                        r.matched,
                        r.held
                    );
                }
            }
            Ok(())
        }
        Command::Identity(IdentityCommand::List { output }) => {
            let mut c = admin(socket).await?;
            let r = c
                .list_identities(pb::ListIdentitiesRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            match output {
                Output::Json => {
                    for i in r.identities {
                        let id = i.identity.unwrap_or_default();
                        let labels: std::collections::BTreeMap<_, _> = id.labels.into_iter().collect();
                        println!(
                            "{}",
                            serde_json::json!({
                                "id": id.id,
                                "spiffe_id": id.spiffe_id,
                                "namespace": id.namespace,
                                "service_account": id.service_account,
                                "labels": labels,
                                "workloads": i.workloads,
                            })
                        );
                    }
                }
                Output::Table => {
                    println!("{:<8} {:<50} WORKLOADS", "ID", "SPIFFE ID");
                    for i in r.identities {
                        let id = i.identity.unwrap_or_default();
                        println!("{:<8} {:<50} {}", id.id, id.spiffe_id, i.workloads.join(", "));
                    }
                }
            }
            Ok(())
        }
    }
}
