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
//!   start; [`unix::serve`] serves one with the caller attested at connect,
//!   and with [`authority`] accepting the `:authority` values that gRPC
//!   clients send on unix sockets.
//! - [`http::serve`] is the metrics and health endpoint (HTTP/1.1), serving
//!   what [`telemetry`] holds: the metrics registry and readiness.

pub mod authority;
pub mod grpc;
pub mod http;
mod limits;
pub mod telemetry;
pub mod unix;

pub use limits::{Closed, Gate, Limits, ListenerMetrics, PeerKey, Permit, Refused};

/// Raises the soft open-files limit to the hard one (as Go programs do at
/// start): the listeners' connection caps are sized in thousands, and a
/// process that runs out of descriptors first cannot accept anyone, its
/// well-behaved clients included. Logs what it did, or why it could not.
pub fn raise_open_files_limit() {
    match raise_nofile() {
        Ok((before, after)) if before != after => {
            tracing::info!(before, after, "raised the open-files limit")
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-files limit"),
    }
}

/// (before, after) of the soft RLIMIT_NOFILE.
#[allow(unsafe_code, reason = "getrlimit/setrlimit have no std equivalent")]
fn raise_nofile() -> std::io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let before = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: raising the soft limit up to the hard one is always allowed.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok((before, lim.rlim_cur))
}
