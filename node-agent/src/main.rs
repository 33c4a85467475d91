use clap::Parser;

/// Keyway node agent.
#[derive(Debug, Parser)]
#[command(name = "node-agent", version, about = "Keyway node agent")]
enum Cli {
    /// Attest to the control plane with a join token and print the node SVID.
    Attest {
        #[arg(long)]
        server: String,
        /// PEM trust bundle (from `control-plane bundle show`).
        #[arg(long)]
        trust_bundle: std::path::PathBuf,
        #[arg(long)]
        node_name: String,
        #[arg(long, env = "KEYWAY_JOIN_TOKEN")]
        join_token: String,
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
    },
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt().with_writer(std::io::stderr).init();
    match run(Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli {
        Cli::Attest {
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
            let id = node_agent::control_plane::attest_with_join_token(
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
