//! The control plane's configuration, parsed once from flags (with env
//! fallbacks) and validated with messages that name the flag.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use keyway_identity::TrustDomain;

/// Validated `serve` configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub trust_domain: TrustDomain,
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub admin_socket: PathBuf,
    /// Default workload X509-SVID lifetime.
    pub svid_ttl: Duration,
    pub node_svid_ttl: Duration,
    pub jwt_ttl: Duration,
    pub ca_ttl: Duration,
    pub upstream_ca: Option<UpstreamFiles>,
    pub kubernetes: bool,
    /// Kubernetes mode: accept join tokens as well as projected service
    /// account tokens (off by default there; always on in standalone mode).
    pub allow_join_tokens: bool,
    /// Attestation attempts a minute per source address (0: no limit).
    pub attest_per_minute: u32,
    /// What the agent API listener allows (connections, timeouts).
    pub agent_api_limits: keyway_serve::Limits,
    /// Datapath entries one policy, and one namespace's policies, may cost.
    pub policy_budget: crate::policy::Budget,
    /// How long a numeric identity no workload uses is kept (a rollout
    /// brings its pods back) before it is forgotten.
    pub identity_gc_grace: Duration,
    /// What the issuance log keeps (the leader prunes the rest).
    pub issuance_retention: crate::store::IssuanceRetention,
}

/// The agent API listener's defaults: every agent holds one connection
/// (plus one while it attests), so a few per node address is plenty and a
/// flood from one address cannot starve the others.
pub fn agent_api_limits() -> keyway_serve::Limits {
    keyway_serve::Limits {
        max_connections: 16384,
        max_per_peer: 32,
        ..keyway_serve::Limits::default()
    }
}

#[derive(Debug, Clone)]
pub struct UpstreamFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Config {
    pub fn max_connections_zero(&self) -> bool {
        self.agent_api_limits.max_connections == 0 || self.agent_api_limits.max_per_peer == 0
    }

    /// The workload SVID TTL actually used: capped so that CA rotation can
    /// retire an old CA before anything it signed could outlive it.
    pub fn effective_svid_ttl(&self, requested: Duration) -> Duration {
        requested.min(self.ca_ttl / 6)
    }
}

/// Parses a duration flag, naming the flag on error.
pub fn duration_flag(flag: &str, value: &str) -> Result<Duration, String> {
    let d = keyway_identity::duration::parse(value).map_err(|e| format!("--{flag}: {e}"))?;
    if d.is_zero() {
        return Err(format!("--{flag}: must be greater than zero"));
    }
    Ok(d)
}
