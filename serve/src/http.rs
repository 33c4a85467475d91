//! The metrics and health endpoint: `/metrics`, `/healthz`, `/readyz` over
//! HTTP/1.1.
//!
//! It binds where Prometheus and the kubelet can reach it (on the agent that
//! is the node's host network), so it is gated like every other listener:
//! capped connections per peer, and a header read timeout that also closes
//! keep-alive connections that sit idle.

use std::fmt::Write as _;
use std::sync::Arc;

use crate::telemetry::{CONTENT_TYPE, Readiness, Registry};
use hyper::{Method, Response, StatusCode, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::watch;

use crate::limits::{Gate, Limits, PeerKey};

/// What the metrics listener allows: scrapes are small and quick, so few
/// connections, few per peer, and five seconds to send the request.
/// The total is generous (a scrape connection costs little and lives five
/// seconds at most without a request) so that one peer, or a handful, cannot
/// fill it and starve the kubelet's probes.
pub fn limits() -> Limits {
    Limits {
        max_connections: 1024,
        max_per_peer: 8,
        request_header_timeout: std::time::Duration::from_secs(5),
        ..Limits::default()
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until
/// `shutdown` turns true.
pub async fn serve(
    listener: tokio::net::TcpListener,
    gate: Arc<Gate>,
    registry: Arc<Registry>,
    readiness: Arc<Readiness>,
    mut shutdown: watch::Receiver<bool>,
) {
    let scrapes = Arc::new(Scrapes {
        registry,
        turn: tokio::sync::Mutex::new(()),
    });
    loop {
        let (stream, addr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(v) => v,
                Err(e) => {
                    gate.accept_failed(&e);
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let Ok(permit) = gate.admit(PeerKey::ip(addr.ip())) else {
            continue;
        };
        let scrapes = scrapes.clone();
        let readiness = readiness.clone();
        let gate = gate.clone();
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let scrapes = scrapes.clone();
                let readiness = readiness.clone();
                async move {
                    let (status, ctype, body) = respond(&req, &scrapes, &readiness).await;
                    Response::builder()
                        .status(status)
                        .header("content-type", ctype)
                        .body(body)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(gate.limits().request_header_timeout)
                .max_buf_size(16 << 10)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let stopping = tokio::select! {
                r = conn.as_mut() => {
                    if r.as_ref().is_err_and(|e| e.is_timeout()) {
                        gate.closed(crate::Closed::HeaderTimeout);
                    }
                    false
                }
                r = shutdown.wait_for(|v| *v) => r.is_ok(),
            };
            if stopping {
                conn.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(std::time::Duration::from_secs(2), conn).await;
            }
        });
    }
}

/// The registry, and whose turn it is to encode it: scrapes wait their
/// turn without holding a runtime worker, and are encoded one at a time on
/// the blocking pool, so a flood of scrapes costs at most one thread.
struct Scrapes {
    registry: Arc<Registry>,
    turn: tokio::sync::Mutex<()>,
}

impl Scrapes {
    async fn render(&self) -> Option<String> {
        let _turn = self.turn.lock().await;
        let registry = self.registry.clone();
        tokio::task::spawn_blocking(move || registry.render()).await.ok()
    }
}

async fn respond(
    req: &hyper::Request<hyper::body::Incoming>,
    scrapes: &Scrapes,
    readiness: &Readiness,
) -> (StatusCode, &'static str, String) {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET\n".to_owned(),
        );
    }
    match req.uri().path() {
        "/metrics" => match scrapes.render().await {
            Some(text) => (StatusCode::OK, CONTENT_TYPE, text),
            None => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                "the metrics could not be encoded\n".to_owned(),
            ),
        },
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
        "/readyz" => {
            // Ready: every component; not ready: those still waited for.
            let components = readiness.components();
            let ready = components.iter().all(|(_, r)| *r);
            let (status, mut body) = if ready {
                (StatusCode::OK, String::from("ready:\n"))
            } else {
                (StatusCode::SERVICE_UNAVAILABLE, String::from("not ready:\n"))
            };
            for (name, r) in &components {
                if ready || !r {
                    let _ = writeln!(body, "{name}");
                }
            }
            (status, "text/plain", body)
        }
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics, /healthz or /readyz\n".to_owned(),
        ),
    }
}
