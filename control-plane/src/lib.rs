//! The Keyway control plane: the CA that issues SPIFFE identities, the
//! registry of workloads and their numeric identities, the agent API (TLS,
//! node SVIDs) and the local admin API.
//!
//! Module map, roughly from the leaves up (`make lint` fails on a cycle
//! between modules; `scripts/module-cycles.py --graph control-plane/src`
//! prints the graph):
//! - leaves: `crd` (the KeywayNetworkPolicy resource: the one raw shape of a
//!   policy), `clock` (wall-clock seconds, read in one place), `jwt`, `csr`
//!   (CA-side CSR checks), `rate_limit`;
//! - `model` (the records the control plane stores and reads, and the
//!   validated policy they carry, made from `crd`'s spec by `TryFrom`), `ca`
//!   (authorities, issuance, rotation schedule), `store` (the `Store` trait,
//!   its rules in `store::rules`, the sled and Kubernetes stores), `policy`
//!   (compilation of policies to datapath entries), `documents` (standalone
//!   YAML documents), `sync` (per-node views and deltas), `config`,
//!   `metrics` (Prometheus families and readiness components), `error`
//!   (`ApiError`, over the errors it converts from), `attest` (the
//!   `NodeAttestor` trait), `tokens` (join tokens, one attestor);
//! - `core` (the control plane as one value: `attest` nodes and their
//!   registration, `issue` SVIDs, CA `rotation`, the `registry` of workloads,
//!   identities and policies, published as a `sync::Cluster`), then what
//!   drives it: `agent_api` and `admin` (the gRPC servers), `kubernetes`
//!   (watch caches, the NetworkPolicy translator, leader election, the
//!   service-account-token attestor),
//!   `cli`.

pub mod admin;
pub mod agent_api;
pub mod attest;
pub mod ca;
pub mod cli;
pub mod clock;
pub mod config;
pub mod core;
pub mod crd;
pub mod csr;
pub mod documents;
pub mod error;
pub mod jwt;
pub mod kubernetes;
pub mod metrics;
pub mod model;
pub mod policy;
pub mod rate_limit;
pub mod store;
pub mod sync;
pub mod tokens;
