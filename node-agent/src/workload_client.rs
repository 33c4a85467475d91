//! A Workload API client for the agent's own CLI (`svid fetch`,
//! `healthcheck`): what `spire-agent api fetch` is to SPIRE.
//!
//! It is the generated tonic client, not the `spiffe` crate's
//! `WorkloadApiClient` (which the tests use as a third-party client), on
//! purpose: the CLI is a diagnostic that prints what the agent served as it
//! was served (the SVIDs' serials and expiries, a refusal's gRPC code and
//! message; `healthcheck` counts PermissionDenied, a caller the agent
//! serves but gives no identity, as healthy) and tells a connection the
//! agent closed at its per-caller limit from no agent at all; the crate
//! returns validated types for an application to use. What is shared with
//! the server side is only the endpoint rules (EP-06..08) and the security
//! header (EP-03), both here.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// Default Workload API socket (DESIGN.md section 5).
pub const DEFAULT_SOCKET: &str = "/run/keyway/sockets/agent.sock";

/// Resolves the socket: an explicit path, else `SPIFFE_ENDPOINT_SOCKET`
/// (EP-06; a `unix:///absolute/path` URI, EP-07/08), else the default.
pub fn socket_path(explicit: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(p) = explicit {
        return Ok(p.to_owned());
    }
    match std::env::var("SPIFFE_ENDPOINT_SOCKET") {
        Ok(uri) => parse_endpoint(&uri),
        Err(_) => Ok(PathBuf::from(DEFAULT_SOCKET)),
    }
}

/// Parses a `unix:///path` endpoint URI strictly (EP-07, EP-08).
pub fn parse_endpoint(uri: &str) -> Result<PathBuf, String> {
    let bad = |why: &str| format!("SPIFFE_ENDPOINT_SOCKET {uri:?}: {why}");
    if uri.starts_with("tcp:") {
        return Err(bad(
            "tcp endpoints are not served by the Keyway agent; use unix:///path",
        ));
    }
    let path = uri
        .strip_prefix("unix://")
        .ok_or_else(|| bad("must be a unix:///absolute/path URI (EP-07)"))?;
    if !path.starts_with('/') {
        return Err(bad("unix URIs have no authority and an absolute path (EP-08)"));
    }
    if path.contains('?') || path.contains('#') || path.len() == 1 {
        return Err(bad("unix URIs have a path and nothing else (EP-08)"));
    }
    Ok(PathBuf::from(path))
}

/// Adds the security header to every call (EP-03).
#[derive(Debug, Clone, Copy)]
pub struct SecurityHeader;

impl Interceptor for SecurityHeader {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert(
            crate::workload_api::SECURITY_HEADER,
            tonic::metadata::MetadataValue::from_static("true"),
        );
        Ok(req)
    }
}

pub type Client = SpiffeWorkloadApiClient<InterceptedService<Channel, SecurityHeader>>;

/// Connects to the Workload API at `path`.
/// A gRPC channel over the unix socket at `path`.
pub async fn unix_channel(path: &Path) -> Result<Channel, tonic::transport::Error> {
    let owned = path.to_owned();
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = owned.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
        }))
        .await
}

pub async fn connect(path: &Path) -> Result<Client, String> {
    let channel = match unix_channel(path).await {
        Ok(c) => c,
        // Something listens but closed the connection: most likely the
        // agent, at its connection limit for this caller.
        Err(e) if tokio::net::UnixStream::connect(path).await.is_ok() => {
            return Err(format!(
                "the Workload API at {} closed the connection ({e}): the agent may hold as many connections \
                 from this caller (pod or uid) as it allows; close idle clients, or see the agent's \
                 keyway_listener_refused_total metric and its log",
                path.display()
            ));
        }
        Err(e) => {
            return Err(format!(
                "cannot reach the Workload API at {}: {e}: is `node-agent run` running? set --socket or SPIFFE_ENDPOINT_SOCKET",
                path.display()
            ));
        }
    };
    Ok(SpiffeWorkloadApiClient::with_interceptor(channel, SecurityHeader))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ep07_ep08_endpoint_uris() {
        assert_eq!(
            parse_endpoint("unix:///tmp/agent.sock").unwrap(),
            PathBuf::from("/tmp/agent.sock")
        );
        for bad in [
            "\t",
            "blah",
            "unix:opaque",
            "unix://",
            "unix://foo",
            "unix:///foo?x",
            "unix:///foo#x",
            "tcp://1.2.3.4:5",
        ] {
            assert!(parse_endpoint(bad).is_err(), "{bad:?} must be refused");
        }
    }
}
