//! The Keyway node agent (DESIGN.md section 5).
//!
//! Module map (`make lint` fails on a cycle between modules;
//! `scripts/module-cycles.py --graph node-agent/src` prints the graph):
//! - `telemetry` (the registry every subsystem registers its metrics in, and
//!   readiness: a leaf), `backoff` (retry waits), `control_plane` (the agent
//!   API client), `state` (the node's view from Sync), `node_svid` (the node
//!   identity on disk), `svid_cache` (workload SVIDs and rotation), `caller`
//!   (out-of-band caller attestation);
//! - `agent` (attestation, the control-plane link, readiness), `workload_api`
//!   (the SPIFFE Workload API server), `workload_client` (the CLI's Workload
//!   API client), `datapath` (the kernel programs: loading, attaching, tables,
//!   the auth map, signals, flow events, their metrics), `explain` (what the
//!   datapath would do with a flow, and why), `mutual_auth` (handshakes
//!   between agents and the auth entries they make), `flows` (flow capture),
//!   `admin` (the local admin socket), `cli`.

pub mod admin;
pub mod agent;
pub mod backoff;
pub mod caller;
pub mod cli;
pub mod control_plane;
pub mod datapath;
pub mod explain;
pub mod flows;
pub mod mutual_auth;
pub mod node_svid;
pub mod state;
pub mod svid_cache;
pub mod telemetry;
pub mod workload_api;
pub mod workload_client;
