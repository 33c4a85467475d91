//! The Keyway node agent (DESIGN.md section 5).
//!
//! Module map: `agent` (wiring and the control-plane link), `control_plane`
//! (the agent API client), `state` (the node's view from Sync), `node_svid`
//! (the node identity on disk), `svid_cache` (workload SVIDs and rotation),
//! `workload_api` (the SPIFFE Workload API server), `datapath` (the kernel
//! programs: loading, attaching, tables, auth map, signals and flow events), `explain` (what
//! the datapath would do with a flow, and why), `caller` (out-of-band
//! caller attestation), `workload_client` (the CLI's Workload API client),
//! `backoff`, `cli`.

pub mod admin;
pub mod agent;
pub mod backoff;
pub mod caller;
pub mod cli;
pub mod control_plane;
pub mod datapath;
pub mod explain;
pub mod flows;
pub mod metrics;
pub mod mutual_auth;
pub mod node_svid;
pub mod state;
pub mod svid_cache;
pub mod workload_api;
pub mod workload_client;
