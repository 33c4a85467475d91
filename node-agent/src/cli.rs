//! The `node-agent` command line (DESIGN.md section 9).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use proto::workload as wpb;
use tokio::sync::watch;
use tracing::info;

use crate::agent::{self, AgentConfig};
use crate::datapath;
use crate::workload_api;
use crate::workload_client;

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
    /// Single-use join token (only needed when no valid node SVID is stored).
    #[arg(long, env = "KEYWAY_JOIN_TOKEN")]
    pub join_token: Option<String>,
    #[arg(long, env = "KEYWAY_AGENT_SOCKET", default_value = workload_client::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Mutual-auth port (used by the handshake issue).
    #[arg(long, default_value_t = 4250)]
    pub auth_port: u16,
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
    /// Emit per-flow events from the datapath (for `observe`).
    #[arg(long, env = "KEYWAY_FLOW_CAPTURE", default_value_t = true, action = clap::ArgAction::Set)]
    pub flow_capture: bool,
}

impl RunArgs {
    fn config(&self) -> anyhow::Result<AgentConfig> {
        let trust_domain = keyway_identity::spiffe_id::parse_trust_domain(&self.trust_domain)
            .map_err(|e| anyhow::anyhow!("--trust-domain: {e}"))?;
        keyway_identity::spiffe_id::check_name("--node-name", &self.node_name).map_err(anyhow::Error::msg)?;
        if self.server.parse::<std::net::SocketAddr>().is_err() && !self.server.contains(':') {
            bail!("--server: {:?} is not HOST:PORT", self.server);
        }
        Ok(AgentConfig {
            server: self.server.clone(),
            trust_domain,
            trust_bundle: self.trust_bundle.clone(),
            node_name: self.node_name.clone(),
            data_dir: self.data_dir.clone(),
            join_token: self.join_token.clone(),
            socket: self.socket.clone(),
            netns_dir: self.netns_dir.clone(),
            proc_root: PathBuf::from("/proc"),
        })
    }
}

async fn run_agent(args: RunArgs) -> anyhow::Result<()> {
    let cfg = args.config()?;
    info!(
        server = %cfg.server,
        node = %cfg.node_name,
        trust_domain = %cfg.trust_domain,
        data_dir = %cfg.data_dir.display(),
        socket = %cfg.socket.display(),
        "starting node agent"
    );
    let (stop_tx, stop_rx) = watch::channel(false);
    let handles = agent::start(cfg.clone(), stop_rx.clone()).await?;
    let _datapath = if args.datapath {
        let mut dcfg = datapath::DatapathConfig::new(&args.bpf_pin_dir, &cfg.node_name);
        dcfg.flow_capture = args.flow_capture;
        let dp = datapath::start(dcfg, handles.state.clone(), stop_rx.clone())
            .with_context(|| format!("--datapath (pins in {})", args.bpf_pin_dir.display()))?;
        info!(pin_dir = %args.bpf_pin_dir.display(), "datapath loaded");
        // Until mutual authentication drives handshakes from these, say
        // that pairs are waiting (once per pair per signal interval).
        let mut signals = dp.signals;
        tokio::spawn(async move {
            while let Some(s) = signals.recv().await {
                info!(
                    local_identity = s.key.local_id,
                    remote_identity = s.key.remote_id,
                    remote_node = s.key.remote_node_id,
                    "datapath dropped a pair that needs mutual authentication"
                );
            }
        });
        Some((dp.auth, dp.status))
    } else {
        None
    };
    let server = workload_api::start(&cfg, &handles, stop_rx.clone())
        .with_context(|| format!("--socket: cannot serve on {}", cfg.socket.display()))?;
    info!(socket = %cfg.socket.display(), "workload API serving");
    wait_for_signal().await;
    info!("shutting down");
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
    let _ = std::fs::remove_file(&cfg.socket);
    Ok(())
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

async fn svid_fetch(socket: Option<PathBuf>, write: Option<PathBuf>, output: Output) -> anyhow::Result<()> {
    let path = workload_client::socket_path(socket.as_deref()).map_err(anyhow::Error::msg)?;
    let mut client = workload_client::connect(&path)
        .await
        .map_err(anyhow::Error::msg)?;
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

async fn healthcheck(socket: Option<PathBuf>) -> anyhow::Result<()> {
    let path = workload_client::socket_path(socket.as_deref()).map_err(anyhow::Error::msg)?;
    let mut client = workload_client::connect(&path)
        .await
        .map_err(anyhow::Error::msg)?;
    match client.fetch_x509_bundles(wpb::X509BundlesRequest {}).await {
        // Serving, whatever this caller is entitled to.
        Ok(_) => {}
        Err(s) if s.code() == tonic::Code::PermissionDenied => {}
        Err(s) => bail!("agent not healthy: {} ({:?})", s.message(), s.code()),
    }
    println!("healthy");
    Ok(())
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(args) => run_agent(args).await,
        Command::Svid(SvidCommand::Fetch {
            socket,
            write,
            output,
        }) => svid_fetch(socket, write, output).await,
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
