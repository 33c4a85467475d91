//! tonic routes served on one connection by hyper's HTTP/2 server, with the
//! listener's clocks.
//!
//! tonic's own `Server` cannot close a connection that holds no stream, so
//! a peer could keep thousands of idle (or never-used) HTTP/2 connections
//! open. Serving each connection here instead lets the server count the
//! requests in flight and send a GOAWAY when the first request does not come
//! in time or the connection has been idle too long. Per-connection facts
//! (the TLS peer, the attested caller) ride into every request as an
//! extension, the way tonic's `Connected` does it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Notify, watch};
use tokio::time::{Instant, Sleep};
use tower::ServiceExt;

use crate::limits::{Closed, Gate};

/// How long a closing connection gets to finish the streams it has.
const DRAIN: Duration = Duration::from_secs(5);

/// How long a connection closed for sending no request in time gets to
/// take its GOAWAY. It has no stream to finish, and hyper cannot send a
/// GOAWAY before the peer's HTTP/2 preface: a peer that never sends one
/// would otherwise hold its slot for the whole [`DRAIN`] past the header
/// timeout (15 s instead of 10 by default).
const FIRST_REQUEST_DRAIN: Duration = Duration::from_millis(500);

/// Serves `routes` on `io` until the peer goes, the connection times out
/// (no first request within the header timeout, or idle), or `shutdown`
/// turns true. `info` is inserted into every request's extensions. The
/// caller keeps the connection's [`crate::Permit`] until this returns.
///
/// `opened` is when the connection was accepted: the header timeout counts
/// from then, so time spent in a TLS handshake counts against it too.
pub async fn serve_connection<I, C>(
    gate: &Gate,
    opened: Instant,
    io: I,
    info: C,
    routes: tonic::service::Routes,
    mut shutdown: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    C: Clone + Send + Sync + 'static,
{
    let limits = gate.limits().clone();
    let activity = Arc::new(Activity::default());
    let service = {
        let activity = activity.clone();
        let body_timeout = limits.request_body_timeout;
        tower::service_fn(move |req: http::Request<hyper::body::Incoming>| {
            let in_flight = InFlight::start(activity.clone());
            let (mut parts, body) = req.into_parts();
            parts.extensions.insert(info.clone());
            let req = http::Request::from_parts(parts, DeadlineBody::new(body, body_timeout));
            let call = routes.clone().oneshot(req);
            async move {
                let resp = call.await?;
                Ok::<_, std::convert::Infallible>(resp.map(|inner| Tracked {
                    inner,
                    _in_flight: in_flight,
                }))
            }
        })
    };
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(limits.max_header_list_size)
        .keep_alive_interval(limits.keepalive_interval)
        .keep_alive_timeout(Duration::from_secs(20));
    let conn = builder.serve_connection(TokioIo::new(io), TowerToHyperService::new(service));
    tokio::pin!(conn);
    let closing = tokio::select! {
        _ = conn.as_mut() => return,
        reason = activity.idle(opened, limits.request_header_timeout, limits.idle_timeout) => Some(reason),
        r = shutdown.wait_for(|v| *v) => {
            // A dropped sender is a shutdown too.
            let _ = r.is_ok();
            None
        }
    };
    if let Some(reason) = closing {
        gate.closed(reason);
        tracing::debug!(
            listener = gate.name(),
            reason = reason.as_str(),
            "closing connection"
        );
    }
    let drain = if closing == Some(Closed::HeaderTimeout) {
        FIRST_REQUEST_DRAIN
    } else {
        DRAIN
    };
    conn.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(drain, conn).await;
}

/// Requests in flight on one connection, and when that last changed.
#[derive(Debug, Default)]
struct Activity {
    active: AtomicUsize,
    started: AtomicU64,
    changed: Notify,
}

impl Activity {
    /// Resolves when the connection should close: no request within `first`
    /// of `opened` ([`Closed::HeaderTimeout`]), or none in flight for `idle`.
    async fn idle(&self, opened: Instant, first: Duration, idle: Duration) -> Closed {
        let mut since = opened;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.active.load(Ordering::Acquire) > 0 {
                changed.await;
                since = Instant::now();
                continue;
            }
            let (limit, reason) = if self.started.load(Ordering::Acquire) == 0 {
                (first, Closed::HeaderTimeout)
            } else {
                (idle, Closed::Idle)
            };
            tokio::select! {
                _ = tokio::time::sleep_until(since + limit) => return reason,
                _ = changed => since = Instant::now(),
            }
        }
    }
}

/// One request in flight, until its response body is done or dropped.
#[derive(Debug)]
struct InFlight(Arc<Activity>);

impl InFlight {
    fn start(activity: Arc<Activity>) -> Self {
        activity.active.fetch_add(1, Ordering::AcqRel);
        activity.started.fetch_add(1, Ordering::AcqRel);
        activity.changed.notify_waiters();
        InFlight(activity)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
        self.0.changed.notify_waiters();
    }
}

/// A response body that keeps its request counted as in flight.
#[derive(Debug)]
struct Tracked<B> {
    inner: B,
    _in_flight: InFlight,
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The request body arrived too slowly.
#[derive(Debug)]
pub struct BodyTimeout;

impl std::fmt::Display for BodyTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the request body did not arrive within the listener's request body timeout")
    }
}

impl std::error::Error for BodyTimeout {}

/// A request body that must be complete within a deadline; a slow one ends
/// in an error (the stream is reset) instead of holding its slot forever.
struct DeadlineBody {
    inner: hyper::body::Incoming,
    deadline: Pin<Box<Sleep>>,
    done: bool,
}

impl DeadlineBody {
    fn new(inner: hyper::body::Incoming, timeout: Duration) -> Self {
        let done = inner.is_end_stream();
        Self {
            inner,
            deadline: Box::pin(tokio::time::sleep(timeout)),
            done,
        }
    }
}

impl Body for DeadlineBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(None) => {
                this.done = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(r)) => {
                if this.inner.is_end_stream() {
                    this.done = true;
                }
                Poll::Ready(Some(r.map_err(Into::into)))
            }
            Poll::Pending if !this.done && this.deadline.as_mut().poll(cx).is_ready() => {
                this.done = true;
                Poll::Ready(Some(Err(Box::new(BodyTimeout))))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_connection_without_a_first_request_times_out() {
        let a = Activity::default();
        let t = Instant::now();
        assert_eq!(
            a.idle(Instant::now(), Duration::from_secs(10), Duration::from_secs(300))
                .await,
            Closed::HeaderTimeout
        );
        assert_eq!(t.elapsed(), Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_never_sends_its_preface_is_let_go_at_the_header_timeout() {
        let gate = Gate::new(
            "test",
            crate::Limits::default(),
            crate::ListenerMetrics::unregistered(),
        );
        // The peer end stays open and silent.
        let (server, _peer) = tokio::io::duplex(1 << 16);
        let (_stop, shutdown) = watch::channel(false);
        let t = Instant::now();
        serve_connection(
            &gate,
            Instant::now(),
            server,
            (),
            tonic::service::Routes::default(),
            shutdown,
        )
        .await;
        assert_eq!(
            t.elapsed(),
            crate::Limits::default().request_header_timeout + FIRST_REQUEST_DRAIN
        );
    }

    #[tokio::test(start_paused = true)]
    async fn requests_in_flight_keep_a_connection_and_idleness_counts_from_the_last() {
        let a = Arc::new(Activity::default());
        let first = InFlight::start(a.clone());
        let watcher = tokio::spawn({
            let a = a.clone();
            async move {
                let t = Instant::now();
                let r = a
                    .idle(Instant::now(), Duration::from_secs(10), Duration::from_secs(60))
                    .await;
                (r, t.elapsed())
            }
        });
        // A long-lived stream: an hour without closing.
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert!(!watcher.is_finished());
        drop(first);
        let (reason, after) = watcher.await.unwrap();
        assert_eq!(reason, Closed::Idle);
        assert_eq!(after, Duration::from_secs(3660));
    }
}
