//! Every listener Keyway runs, and what each one allows.
//!
//! A listener that anyone on the node (or the network) can reach is an
//! attack surface before any authentication happens: a connection costs a
//! file descriptor, buffers and a task, and an idle or half-sent one costs
//! them for as long as the server lets it. So every listener here goes
//! through one [`Gate`] with a cap on connections in total and per peer (an
//! IP address, a /64 for IPv6, or a local caller), and every connection is
//! served with the same clocks: a deadline for the first request (the
//! "header read timeout"), a deadline for each request body, and an idle
//! timeout once no request is in flight. Refusals and closes are counted in
//! `keyway_listener_*` metrics and logged once per peer and reason a minute.
//!
//! - [`grpc::serve_connection`] serves tonic routes on one connection with
//!   hyper's HTTP/2 server (so an idle connection gets a GOAWAY, not a reset).
//! - [`unix::bind`] creates unix sockets with their final mode from the
//!   start; [`unix::serve`] serves one with the caller attested at connect.
//! - [`http::serve`] is the metrics and health endpoint (HTTP/1.1).

pub mod grpc;
pub mod http;
mod limits;
pub mod unix;

pub use limits::{Gate, Limits, ListenerMetrics, PeerKey, Permit, Refused};
