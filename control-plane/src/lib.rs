//! The Keyway control plane: the CA that issues SPIFFE identities, the
//! registry of workloads and their numeric identities, the agent API (TLS,
//! node SVIDs) and the local admin API.
//!
//! Module map: `ca` (authorities, issuance, rotation schedule), `jwt`, `csr`
//! (CA-side CSR checks), `store` (the `Store` trait and sled), `registry`
//! (standalone documents), `policy` (KeywayNetworkPolicy and its compilation
//! to datapath entries), `tokens` (join tokens), `server` (the control plane
//! as one value), `sync` (per-node views and deltas), `metrics` (Prometheus
//! families and readiness), `agent_api`, `admin`, `cli`, `clock` (wall-clock
//! seconds, read in one place).

pub mod admin;
pub mod agent_api;
pub mod ca;
pub mod cli;
pub mod clock;
pub mod config;
pub mod csr;
pub mod jwt;
pub mod kubernetes;
pub mod metrics;
pub mod policy;
pub mod rate_limit;
pub mod registry;
pub mod server;
pub mod store;
pub mod sync;
pub mod tokens;
