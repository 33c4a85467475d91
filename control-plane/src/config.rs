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
}

#[derive(Debug, Clone)]
pub struct UpstreamFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Config {
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
