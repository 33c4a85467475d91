//! The `node-agent` command line (DESIGN.md section 9).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use proto::workload as wpb;
use tokio::sync::watch;
use tracing::info;

use crate::agent::{self, AgentConfig};
use crate::datapath::{self, AuthMap};
use crate::workload_api;
use crate::workload_client;
use crate::{admin, flows, mutual_auth};

#[derive(Debug, Parser)]
#[command(name = "node-agent", version, about = "Keyway node agent")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: attest, keep SVIDs fresh, serve the Workload API.
    Run(RunArgs),
    /// Workload API client commands.
    #[command(subcommand)]
    Svid(SvidCommand),
    /// Mutual-authentication state.
    #[command(subcommand)]
    Auth(AuthCommand),
    /// Flows the datapath judged on this node, with identities and verdicts.
    Observe(ObserveArgs),
    /// What the datapath would do with a flow and why: identities, the
    /// policy entry, the auth entry, the verdict, and what to change.
    Explain(ExplainArgs),
    /// Exit 0 when the agent answers on its Workload API socket.
    Healthcheck {
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// Attest once with a join token and print the node SVID (diagnostics).
    Attest {
        #[arg(long)]
        server: String,
        #[arg(long)]
        trust_bundle: PathBuf,
        #[arg(long)]
        node_name: String,
        #[arg(long, env = "KEYWAY_JOIN_TOKEN")]
        join_token: String,
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum SvidCommand {
    /// Fetch this caller's X509-SVIDs from the Workload API.
    Fetch {
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Write svid.pem, key.pem (0600) and bundle.pem here.
        #[arg(long)]
        write: Option<PathBuf>,
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Fetch a JWT-SVID for AUDIENCE and print the token (text) or the
    /// token with its SPIFFE ID and audience (json).
    Jwt {
        #[arg(long)]
        socket: Option<PathBuf>,
        /// The audience the token is for (repeatable).
        #[arg(long = "audience", required = true)]
        audiences: Vec<String>,
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Have the agent validate a JWT-SVID for AUDIENCE: prints the subject's
    /// SPIFFE ID, exits non-zero when the token is not valid.
    ValidateJwt {
        #[arg(long)]
        socket: Option<PathBuf>,
        #[arg(long)]
        audience: String,
        /// The token, or `-` (the default) to read it from stdin: a command
        /// line is visible to every user in `ps`.
        #[arg(default_value = "-")]
        token: String,
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuthCommand {
    /// The authenticated identity pairs: peers, node, expiry and age.
    List {
        #[arg(long, env = "KEYWAY_AGENT_ADMIN_SOCKET", default_value = admin::DEFAULT_SOCKET)]
        admin_socket: PathBuf,
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: Output,
    },
}

#[derive(Debug, clap::Args)]
pub struct ExplainArgs {
    #[arg(long, env = "KEYWAY_AGENT_ADMIN_SOCKET", default_value = admin::DEFAULT_SOCKET)]
    pub admin_socket: PathBuf,
    /// The source: namespace/name of a workload, or an IPv4 address.
    #[arg(long)]
    pub from: String,
    /// The destination: namespace/name of a workload, or an IPv4 address.
    #[arg(long)]
    pub to: String,
    /// Destination port.
    #[arg(long, default_value_t = 0)]
    pub port: u16,
    /// tcp, udp, sctp, icmp or an IP protocol number.
    #[arg(long, default_value = "tcp")]
    pub proto: String,
    /// The pod interface the packet enters from, when not the source's own
    /// (as `observe` shows for a source-spoofed drop).
    #[arg(long)]
    pub via: Option<String>,
    #[arg(short = 'o', long, value_enum, default_value = "text")]
    pub output: Output,
}

#[derive(Debug, clap::Args)]
pub struct ObserveArgs {
    #[arg(long, env = "KEYWAY_AGENT_ADMIN_SOCKET", default_value = admin::DEFAULT_SOCKET)]
    pub admin_socket: PathBuf,
    /// Keep streaming new flows.
    #[arg(short, long)]
    pub follow: bool,
    #[arg(short = 'o', long, value_enum, default_value = "text")]
    pub output: Output,
    /// Either end in this namespace.
    #[arg(long)]
    pub namespace: Option<String>,
    /// Either end is this workload (pod).
    #[arg(long)]
    pub pod: Option<String>,
    /// Either end has this identity: its number (as in flow lines) or its
    /// SPIFFE ID.
    #[arg(long, value_parser = parse_identity_filter)]
    pub identity: Option<IdentityFilter>,
    /// FORWARDED or DROPPED.
    #[arg(long)]
    pub verdict: Option<String>,
    /// e.g. policy-denied, auth-required.
    #[arg(long)]
    pub drop_reason: Option<String>,
    /// Destination port.
    #[arg(long)]
    pub port: Option<u16>,
    /// Only flows from the last DURATION (e.g. 30s, 5m).
    #[arg(long)]
    pub since: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The control plane's agent API, HOST:PORT.
    #[arg(long, env = "KEYWAY_SERVER")]
    pub server: String,
    /// PEM bundle to trust for the first connection.
    #[arg(long, env = "KEYWAY_TRUST_BUNDLE")]
    pub trust_bundle: PathBuf,
    #[arg(long, env = "KEYWAY_NODE_NAME")]
    pub node_name: String,
    #[arg(long, env = "KEYWAY_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    #[arg(long, env = "KEYWAY_DATA_DIR", default_value = "/var/lib/keyway/agent")]
    pub data_dir: PathBuf,
    /// Single-use join token (only needed when no valid node SVID is
    /// stored). Prefer --join-token-file or the KEYWAY_JOIN_TOKEN variable:
    /// a command line is visible to every user in `ps`.
    #[arg(long, env = "KEYWAY_JOIN_TOKEN", conflicts_with_all = ["k8s_token_file", "join_token_file"])]
    pub join_token: Option<String>,
    /// Read the join token from this file (the preferred way: mode 0600,
    /// deleted after the first attestation if you like; the token is single-use).
    #[arg(long, env = "KEYWAY_JOIN_TOKEN_FILE", conflicts_with = "k8s_token_file")]
    pub join_token_file: Option<PathBuf>,
    /// Kubernetes: attest with this projected service account token
    /// (audience `keyway`, bound to this agent's pod) instead of a join
    /// token. Read at every attempt, since the kubelet rotates it.
    #[arg(long, env = "KEYWAY_K8S_TOKEN_FILE")]
    pub k8s_token_file: Option<PathBuf>,
    #[arg(long, env = "KEYWAY_AGENT_SOCKET", default_value = workload_client::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// The mutual-auth port peer agents dial (0: any free port, for tests).
    #[arg(long, env = "KEYWAY_AUTH_PORT", default_value_t = mutual_auth::DEFAULT_PORT)]
    pub auth_port: u16,
    /// The address peers reach this node's auth port at (repeatable;
    /// default: the address this node uses to reach the control plane).
    #[arg(long = "auth-address", env = "KEYWAY_AUTH_ADDRESS", value_delimiter = ',')]
    pub auth_addresses: Vec<std::net::IpAddr>,
    /// The agent's admin socket (`node-agent auth list`), mode 0600.
    #[arg(long, env = "KEYWAY_AGENT_ADMIN_SOCKET", default_value = admin::DEFAULT_SOCKET)]
    pub admin_socket: PathBuf,
    /// Where named network namespaces live (for `netns:` selectors).
    #[arg(long, default_value = "/var/run/netns")]
    pub netns_dir: PathBuf,
    /// Load the eBPF datapath and attach it to every local workload's
    /// interface (needs root, or CAP_BPF + CAP_NET_ADMIN + CAP_PERFMON).
    #[arg(long, env = "KEYWAY_DATAPATH")]
    pub datapath: bool,
    /// Where the datapath pins its maps and links (a BPF filesystem). One
    /// per node: several agents on one kernel need their own.
    #[arg(long, env = "KEYWAY_BPF_PIN_DIR", default_value = datapath::DEFAULT_PIN_DIR)]
    pub bpf_pin_dir: PathBuf,
    /// How many flows `observe` can look back on.
    #[arg(long, env = "KEYWAY_FLOW_BUFFER", default_value_t = flows::DEFAULT_CAPACITY)]
    pub flow_buffer: usize,
    /// Emit per-flow events from the datapath (for `observe`).
    #[arg(long, env = "KEYWAY_FLOW_CAPTURE", default_value_t = true, action = clap::ArgAction::Set)]
    pub flow_capture: bool,
    /// Serve Prometheus `/metrics`, `/healthz` and `/readyz` over plain HTTP
    /// on HOST:PORT, or `off`.
    #[arg(long, env = "KEYWAY_METRICS_ADDRESS", default_value = "127.0.0.1:9091")]
    pub metrics_address: String,
    /// Workload API connections held at once.
    #[arg(long, default_value_t = workload_api::limits().max_connections)]
    pub workload_api_max_connections: usize,
    /// Workload API connections one caller (a pod, or a uid outside pods)
    /// holds at once.
    #[arg(long, default_value_t = workload_api::limits().max_per_peer)]
    pub workload_api_max_connections_per_caller: usize,
}

impl RunArgs {
    fn config(&self) -> anyhow::Result<AgentConfig> {
        let trust_domain = keyway_identity::spiffe_id::parse_trust_domain(&self.trust_domain)
            .map_err(|e| anyhow::anyhow!("--trust-domain: {e}"))?;
        keyway_identity::spiffe_id::check_name("--node-name", &self.node_name).map_err(anyhow::Error::msg)?;
        if self.server.parse::<std::net::SocketAddr>().is_err() && !self.server.contains(':') {
            bail!("--server: {:?} is not HOST:PORT", self.server);
        }
        if self.workload_api_max_connections == 0 || self.workload_api_max_connections_per_caller == 0 {
            bail!(
                "--workload-api-max-connections and --workload-api-max-connections-per-caller must be at least 1"
            );
        }
        let join_token = match (&self.join_token, &self.join_token_file) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(path)) => {
                let t = std::fs::read_to_string(path)
                    .with_context(|| format!("--join-token-file: cannot read {}", path.display()))?;
                let t = t.trim().to_owned();
                if t.is_empty() {
                    bail!("--join-token-file: {} is empty", path.display());
                }
                Some(t)
            }
            (None, None) => None,
        };
        Ok(AgentConfig {
            server: self.server.clone(),
            trust_domain,
            trust_bundle: self.trust_bundle.clone(),
            node_name: self.node_name.clone(),
            data_dir: self.data_dir.clone(),
            join_token,
            k8s_token_file: self.k8s_token_file.clone(),
            socket: self.socket.clone(),
            netns_dir: self.netns_dir.clone(),
            proc_root: PathBuf::from("/proc"),
            auth_addresses: Vec::new(),
            workload_api_limits: keyway_serve::Limits {
                max_connections: self.workload_api_max_connections,
                max_per_peer: self.workload_api_max_connections_per_caller,
                ..workload_api::limits()
            },
        })
    }
}

async fn run_agent(args: RunArgs) -> anyhow::Result<()> {
    let mut cfg = args.config()?;
    keyway_serve::raise_open_files_limit();
    // The auth port is bound before attestation so a taken port fails fast,
    // and so the advertised address carries the real port.
    let auth_listener = mutual_auth::bind_any(args.auth_port)
        .await
        .with_context(|| format!("--auth-port {}: cannot listen", args.auth_port))?;
    let auth_port = auth_listener.local_addr()?.port();
    let ips = if args.auth_addresses.is_empty() {
        vec![route_source_ip(&cfg.server).await.with_context(|| {
            format!(
                "cannot tell which address reaches {}; pass --auth-address",
                cfg.server
            )
        })?]
    } else {
        args.auth_addresses.clone()
    };
    if let Some(bad) = ips.iter().find(|ip| ip.is_unspecified() || ip.is_multicast()) {
        bail!("--auth-address {bad}: peers cannot dial it; give an address of this node");
    }
    cfg.auth_addresses = ips
        .iter()
        .map(|ip| std::net::SocketAddr::new(*ip, auth_port).to_string())
        .collect();
    let metrics_address = match args.metrics_address.as_str() {
        "off" => None,
        v => Some(v.parse::<std::net::SocketAddr>().map_err(|_| {
            anyhow::anyhow!("--metrics-address: {v:?} is not HOST:PORT (e.g. 127.0.0.1:9091) or `off`")
        })?),
    };
    let admin_listener = admin::bind(&args.admin_socket)
        .await
        .map_err(anyhow::Error::msg)?;
    info!(
        server = %cfg.server,
        node = %cfg.node_name,
        trust_domain = %cfg.trust_domain,
        data_dir = %cfg.data_dir.display(),
        socket = %cfg.socket.display(),
        "starting node agent"
    );
    let (stop_tx, stop_rx) = watch::channel(false);
    // Listening before attestation, so /readyz says what is missing meanwhile.
    let telemetry = crate::telemetry::Telemetry::new(agent::READY_COMPONENTS);
    if args.datapath {
        telemetry.readiness.expect(agent::READY_DATAPATH);
    }
    // Every family is registered before the listener binds, so /metrics
    // lists them all while the agent attests (the datapath's whether or not
    // it runs).
    let core_metrics = agent::CoreMetrics::register(&telemetry.registry);
    let auth_metrics = mutual_auth::AuthMetrics::register(&telemetry.registry, telemetry.listeners.clone());
    let stream_metrics =
        workload_api::StreamMetrics::register(&telemetry.registry, telemetry.listeners.clone());
    let datapath_metrics = datapath::metrics::DatapathMetrics::register(&telemetry.registry);
    if let Some(address) = metrics_address {
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| format!("--metrics-address: cannot bind {address}"))?;
        info!(metrics_address = %listener.local_addr()?, "metrics and health endpoints listening");
        let gate = keyway_serve::Gate::new(
            "metrics",
            keyway_serve::http::limits(),
            telemetry.listeners.clone(),
        );
        tokio::spawn(keyway_serve::http::serve(
            listener,
            gate,
            telemetry.registry.clone(),
            telemetry.readiness.clone(),
            stop_rx.clone(),
        ));
    }
    let handles =
        agent::start_with_telemetry(cfg.clone(), telemetry.clone(), core_metrics, stop_rx.clone()).await?;
    let mut datapath_streams = None;
    let (auth_map, signals): (Arc<dyn AuthMap>, _) = if args.datapath {
        let mut dcfg = datapath::DatapathConfig::new(&args.bpf_pin_dir, &cfg.node_name);
        dcfg.flow_capture = args.flow_capture;
        dcfg.proc_root = cfg.proc_root.clone();
        dcfg.netns_dir = cfg.netns_dir.clone();
        let dp = datapath::start(dcfg, handles.state.clone(), stop_rx.clone())
            .with_context(|| format!("--datapath (pins in {})", args.bpf_pin_dir.display()))?;
        info!(pin_dir = %args.bpf_pin_dir.display(), "datapath loaded");
        match datapath::drops::DropCounters::open(&args.bpf_pin_dir) {
            Ok(drops) => datapath_metrics.watch_drops_and_signals(
                drops,
                dp.signal_queue.clone(),
                dp.signal_counts.clone(),
            ),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the datapath's drop counters; keyway_datapath_drops_total stays empty")
            }
        }
        datapath_metrics.watch_endpoints(dp.status.clone());
        telemetry.readiness.set_ready(agent::READY_DATAPATH);
        datapath_streams = Some((dp.flows, dp.status));
        (dp.auth, Some(dp.signals))
    } else {
        (Arc::new(datapath::MemoryAuthMap::default()), None)
    };
    let mut auth_cfg = mutual_auth::MutualAuthConfig::new(&cfg.node_name);
    auth_cfg.metrics = auth_metrics;
    let auth = mutual_auth::start(
        auth_cfg,
        auth_listener,
        handles.state.clone(),
        handles.svids.clone(),
        auth_map,
        signals,
        stop_rx.clone(),
    )?;
    info!(listen = %auth.listen, advertised = ?cfg.auth_addresses, "mutual-auth port listening");
    let flow_log = datapath_streams.map(|(flows, status)| {
        let log = flows::FlowLog::new(args.flow_buffer);
        flows::run(
            log.clone(),
            flows.subscribe(),
            handles.state.clone(),
            status,
            auth.entries.clone(),
            cfg.node_name.clone(),
            stop_rx.clone(),
        );
        log
    });
    let admin_server = admin::serve(
        admin_listener,
        admin::AdminState {
            state: handles.state.clone(),
            auth: auth.entries.clone(),
            datapath: args.datapath,
            flows: flow_log,
            pin_dir: args.datapath.then(|| args.bpf_pin_dir.clone()),
        },
        telemetry.listeners.clone(),
        stop_rx.clone(),
    );
    let server = workload_api::start(&cfg, &handles, stream_metrics, stop_rx.clone())
        .with_context(|| format!("--socket: cannot serve on {}", cfg.socket.display()))?;
    info!(socket = %cfg.socket.display(), "workload API serving");
    wait_for_signal().await;
    info!("shutting down");
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), admin_server).await;
    let _ = std::fs::remove_file(&cfg.socket);
    let _ = std::fs::remove_file(&args.admin_socket);
    Ok(())
}

/// The local address the kernel would use to reach `server` (HOST:PORT).
async fn route_source_ip(server: &str) -> anyhow::Result<std::net::IpAddr> {
    let target = tokio::net::lookup_host(server)
        .await?
        .next()
        .context("the server name resolves to nothing")?;
    let probe = std::net::UdpSocket::bind(("0.0.0.0", 0))?;
    probe.connect(target)?;
    Ok(probe.local_addr()?.ip())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn der_certs(concatenated: &[u8]) -> anyhow::Result<Vec<Vec<u8>>> {
    keyway_identity::x509::split_der(concatenated)
        .map_err(|e| anyhow::anyhow!("bad certificate in the response: {e}"))
}

/// A Workload API client on `--socket` (or SPIFFE_ENDPOINT_SOCKET).
async fn workload_client_at(socket: Option<PathBuf>) -> anyhow::Result<workload_client::Client> {
    let path = workload_client::socket_path(socket.as_deref()).map_err(anyhow::Error::msg)?;
    workload_client::connect(&path).await.map_err(anyhow::Error::msg)
}

async fn svid_fetch(socket: Option<PathBuf>, write: Option<PathBuf>, output: Output) -> anyhow::Result<()> {
    let mut client = workload_client_at(socket).await?;
    let mut stream = client
        .fetch_x509svid(wpb::X509svidRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("{} ({:?})", s.message(), s.code()))?
        .into_inner();
    let resp = tokio::time::timeout(Duration::from_secs(30), stream.message())
        .await
        .context("no SVID within 30s")?
        .map_err(|s| anyhow::anyhow!("{} ({:?})", s.message(), s.code()))?
        .context("the agent closed the stream")?;
    let first = resp.svids.first().context("the response has no SVID")?;
    let chain = der_certs(&first.x509_svid)?;
    let bundle = der_certs(&first.bundle)?;
    if let Some(dir) = &write {
        keyway_identity::pem::write_svid_dir(dir, &chain, &first.x509_svid_key, &bundle)
            .with_context(|| format!("--write: cannot write to {}", dir.display()))?;
    }
    for s in &resp.svids {
        let leaf = der_certs(&s.x509_svid)?;
        let info = keyway_identity::x509::inspect_leaf(&leaf[0]).map_err(|e| anyhow::anyhow!("{e}"))?;
        let not_after = info
            .not_after
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        match output {
            Output::Json => println!(
                "{}",
                serde_json::json!({
                    "spiffe_id": s.spiffe_id,
                    "serial": info.serial.iter().map(|b| format!("{b:02x}")).collect::<String>(),
                    "not_after": not_after,
                    "chain_len": leaf.len(),
                })
            ),
            Output::Text => println!("{}  expires {}", s.spiffe_id, not_after),
        }
    }
    if let Some(dir) = write {
        eprintln!("wrote {0}/svid.pem {0}/key.pem {0}/bundle.pem", dir.display());
    }
    Ok(())
}

fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{} ({:?})", s.message(), s.code())
}

async fn svid_jwt(socket: Option<PathBuf>, audience: Vec<String>, output: Output) -> anyhow::Result<()> {
    let mut client = workload_client_at(socket).await?;
    let resp = client
        .fetch_jwtsvid(wpb::JwtsvidRequest {
            audience: audience.clone(),
            spiffe_id: String::new(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let svid = resp.svids.first().context("the response has no JWT-SVID")?;
    match output {
        Output::Text => println!("{}", svid.svid),
        Output::Json => println!(
            "{}",
            serde_json::json!({ "spiffe_id": svid.spiffe_id, "audience": audience, "token": svid.svid })
        ),
    }
    Ok(())
}

async fn svid_validate_jwt(
    socket: Option<PathBuf>,
    audience: String,
    token: String,
    output: Output,
) -> anyhow::Result<()> {
    let token = if token == "-" {
        let mut t = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut t)
            .context("reading the token from stdin")?;
        t.trim().to_owned()
    } else {
        token
    };
    let mut client = workload_client_at(socket).await?;
    let resp = client
        .validate_jwtsvid(wpb::ValidateJwtsvidRequest {
            audience,
            svid: token,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    match output {
        Output::Text => println!("{}", resp.spiffe_id),
        Output::Json => println!("{}", serde_json::json!({ "spiffe_id": resp.spiffe_id })),
    }
    Ok(())
}

async fn healthcheck(socket: Option<PathBuf>) -> anyhow::Result<()> {
    let mut client = workload_client_at(socket).await?;
    match client.fetch_x509_bundles(wpb::X509BundlesRequest {}).await {
        // Serving, whatever this caller is entitled to.
        Ok(_) => {}
        Err(s) if s.code() == tonic::Code::PermissionDenied => {}
        Err(s) => bail!("agent not healthy: {} ({:?})", s.message(), s.code()),
    }
    println!("healthy");
    Ok(())
}

/// `observe --identity`: a numeric identity or a SPIFFE ID.
#[derive(Debug, Clone)]
pub enum IdentityFilter {
    Number(u32),
    SpiffeId(String),
}

fn parse_identity_filter(s: &str) -> Result<IdentityFilter, String> {
    if let Ok(n) = s.parse::<u32>() {
        return Ok(IdentityFilter::Number(n));
    }
    keyway_identity::spiffe_id::parse_spiffe_id(s)
        .map(|id| IdentityFilter::SpiffeId(id.to_string()))
        .map_err(|e| format!("{s:?} is neither a numeric identity nor a SPIFFE ID: {e}"))
}

async fn observe(a: ObserveArgs) -> anyhow::Result<()> {
    let since_unix_ms = match &a.since {
        Some(d) => {
            let d = keyway_identity::duration::parse(d).map_err(|e| anyhow::anyhow!("--since: {e}"))?;
            let t = std::time::SystemTime::now() - d;
            t.duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0)
        }
        None => 0,
    };
    let (identity, spiffe_id) = match a.identity {
        Some(IdentityFilter::Number(n)) => (n, String::new()),
        Some(IdentityFilter::SpiffeId(id)) => (0, id),
        None => (0, String::new()),
    };
    let req = proto::keyway::ObserveRequest {
        follow: a.follow,
        namespace: a.namespace.unwrap_or_default(),
        pod: a.pod.unwrap_or_default(),
        identity,
        spiffe_id,
        verdict: a.verdict.unwrap_or_default(),
        drop_reason: a.drop_reason.unwrap_or_default(),
        port: a.port.map(u32::from).unwrap_or(0),
        since_unix_ms,
    };
    let mut client = admin::connect(&a.admin_socket)
        .await
        .map_err(anyhow::Error::msg)?;
    let mut stream = client
        .observe(req)
        .await
        .map_err(|s| anyhow::anyhow!("{} ({:?})", s.message(), s.code()))?
        .into_inner();
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    while let Some(r) = stream
        .message()
        .await
        .map_err(|s| anyhow::anyhow!("{} ({:?})", s.message(), s.code()))?
    {
        let line = match a.output {
            Output::Text => flows::format_line(&r),
            Output::Json => flow_json(&r).to_string(),
        };
        if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
            break;
        }
    }
    Ok(())
}

async fn explain(a: ExplainArgs) -> anyhow::Result<()> {
    let mut client = admin::connect(&a.admin_socket)
        .await
        .map_err(anyhow::Error::msg)?;
    let r = client
        .explain(proto::keyway::ExplainRequest {
            from: a.from,
            to: a.to,
            port: u32::from(a.port),
            protocol: a.proto,
            via: a.via.unwrap_or_default(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("{} ({:?})", s.message(), s.code()))?
        .into_inner();
    match a.output {
        Output::Text => print!("{}", crate::explain::format_text(&r)),
        Output::Json => println!("{}", crate::explain::to_json(&r)),
    }
    Ok(())
}

fn flow_json(r: &proto::keyway::FlowRecord) -> serde_json::Value {
    let end = |e: &Option<proto::keyway::FlowEndpoint>| {
        let e = e.clone().unwrap_or_default();
        serde_json::json!({
            "ip": e.ip, "port": e.port, "identity": e.identity, "namespace": e.namespace,
            "pod": e.pod, "service_account": e.service_account, "spiffe_id": e.spiffe_id,
        })
    };
    serde_json::json!({
        "time_unix_ms": r.time_unix_ms,
        "event": r.event,
        "source": end(&r.source),
        "destination": end(&r.destination),
        "protocol": r.protocol,
        "verdict": r.verdict,
        "drop_reason": r.drop_reason,
        "auth": r.auth,
        "rule": r.rule,
        "direction": r.direction,
        "node": r.node,
        "interface": r.interface,
        "sender": r.sender.as_ref().map(|_| end(&r.sender)),
    })
}

async fn auth_list(admin_socket: PathBuf, output: Output) -> anyhow::Result<()> {
    let mut client = admin::connect(&admin_socket).await.map_err(anyhow::Error::msg)?;
    let resp = client
        .list_auth(proto::keyway::ListAuthRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("{} ({:?})", s.message(), s.code()))?
        .into_inner();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    match output {
        Output::Json => {
            for e in &resp.entries {
                println!(
                    "{}",
                    serde_json::json!({
                        "local_identity": e.local_identity,
                        "local_spiffe_id": e.local_spiffe_id,
                        "remote_identity": e.remote_identity,
                        "remote_spiffe_id": e.remote_spiffe_id,
                        "remote_node_id": e.remote_node_id,
                        "remote_node": e.remote_node,
                        "expires_unix": e.expires_unix,
                        "authenticated_unix": e.authenticated_unix,
                        "via": e.via,
                    })
                );
            }
        }
        Output::Text => {
            if !resp.datapath {
                eprintln!("note: this agent runs without --datapath; nothing enforces these entries");
            }
            let name = |id: u32, s: &str| {
                if s.is_empty() {
                    id.to_string()
                } else {
                    format!("{s} ({id})")
                }
            };
            // Whole seconds: an entry a few milliseconds old is "0s", not "0ms".
            let secs = |n: i64| {
                if n <= 0 {
                    "0s".to_string()
                } else {
                    keyway_identity::duration::format(Duration::from_secs(n as u64))
                }
            };
            let rows: Vec<[String; 6]> = resp
                .entries
                .iter()
                .map(|e| {
                    [
                        name(e.local_identity, &e.local_spiffe_id),
                        name(e.remote_identity, &e.remote_spiffe_id),
                        if e.remote_node.is_empty() {
                            e.remote_node_id.to_string()
                        } else {
                            e.remote_node.clone()
                        },
                        secs(e.expires_unix - now),
                        secs(now - e.authenticated_unix),
                        e.via.clone(),
                    ]
                })
                .collect();
            let header = ["LOCAL", "REMOTE", "NODE", "EXPIRES IN", "AGE", "VIA"].map(String::from);
            let mut width = header.clone().map(|h| h.len());
            for r in &rows {
                for (w, c) in width.iter_mut().zip(r) {
                    *w = (*w).max(c.len());
                }
            }
            for r in std::iter::once(&header).chain(&rows) {
                let cells: Vec<String> = r.iter().zip(width).map(|(c, w)| format!("{c:<w$}")).collect();
                println!("{}", cells.join("  ").trim_end());
            }
        }
    }
    Ok(())
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Auth(AuthCommand::List { admin_socket, output }) => auth_list(admin_socket, output).await,
        Command::Observe(a) => observe(a).await,
        Command::Explain(a) => explain(a).await,
        Command::Run(args) => run_agent(args).await,
        Command::Svid(SvidCommand::Fetch {
            socket,
            write,
            output,
        }) => svid_fetch(socket, write, output).await,
        Command::Svid(SvidCommand::Jwt {
            socket,
            audiences,
            output,
        }) => svid_jwt(socket, audiences, output).await,
        Command::Svid(SvidCommand::ValidateJwt {
            socket,
            audience,
            token,
            output,
        }) => svid_validate_jwt(socket, audience, token, output).await,
        Command::Healthcheck { socket } => healthcheck(socket).await,
        Command::Attest {
            server,
            trust_bundle,
            node_name,
            join_token,
            trust_domain,
        } => {
            let td = keyway_identity::spiffe_id::parse_trust_domain(&trust_domain)?;
            let pem = std::fs::read_to_string(&trust_bundle).map_err(|e| {
                anyhow::anyhow!("--trust-bundle: cannot read {}: {e}", trust_bundle.display())
            })?;
            let bundle = keyway_identity::TrustBundle::from_pem(td, &pem)?;
            let id = crate::control_plane::attest_with_join_token(
                &server,
                std::sync::Arc::new(bundle),
                &node_name,
                &join_token,
            )
            .await?;
            println!("{} (node id {})", id.svid.spiffe_id(), id.node_id);
            print!("{}", id.svid.chain_pem());
            Ok(())
        }
    }
}
