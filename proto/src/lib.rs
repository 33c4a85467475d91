//! Wire types for Keyway.
//!
//! `workload` is the SPIFFE Workload API with no protobuf package, so its gRPC
//! paths are `/SpiffeWorkloadAPI/<Method>` exactly as SPIRE and the SPIFFE client
//! libraries expect. `keyway` is the control plane's own API (`keyway.v1`).

/// The SPIFFE Workload API (`/SpiffeWorkloadAPI/*`).
#[allow(clippy::all, missing_debug_implementations, reason = "generated code")]
pub mod workload {
    tonic::include_proto!("_");
}

/// Keyway's control-plane APIs (`keyway.v1`).
#[allow(clippy::all, missing_debug_implementations, reason = "generated code")]
pub mod keyway {
    tonic::include_proto!("keyway.v1");
}

/// Largest message the agent-facing API accepts. CSRs are a few hundred bytes;
/// anything near this is an error or an attack, not a request.
pub const MAX_AGENT_REQUEST_BYTES: usize = 64 * 1024;

#[cfg(test)]
mod tests {
    #[test]
    fn workload_api_service_has_no_package() {
        // SPIFFE clients dial `/SpiffeWorkloadAPI/FetchX509SVID`; a package
        // prefix here would make every client fail with Unimplemented.
        use super::workload::spiffe_workload_api_server::SERVICE_NAME;
        assert_eq!(SERVICE_NAME, "SpiffeWorkloadAPI");
    }
}
