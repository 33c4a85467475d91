//! Mutual authentication's metric families: handshakes by role and result,
//! their duration, and the entries held.

use std::sync::Arc;
use std::time::Instant;

use keyway_identity::metrics::{Counter, Gauge, Histogram, LATENCY_BUCKETS, LogLimiter, Registry};
use tokio::sync::watch;

use super::AuthRecord;

/// Which side of a mutual-auth handshake this agent was on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeRole {
    /// This agent dialled the peer agent.
    Dial,
    /// A peer agent dialled this one.
    Answer,
}

impl HandshakeRole {
    pub fn as_str(self) -> &'static str {
        match self {
            HandshakeRole::Dial => "dial",
            HandshakeRole::Answer => "answer",
        }
    }
}

/// Mutual auth's metrics, registered once per registry. Cheap to clone.
#[derive(Debug, Clone)]
pub struct AuthMetrics {
    handshakes: Counter,
    handshake_seconds: Histogram,
    auth_map_entries: Gauge,
    /// Failed handshakes answered for peers are logged once per peer and
    /// reason per minute.
    pub handshake_log: Arc<LogLimiter>,
    /// The auth port's listener metrics.
    pub listeners: keyway_serve::ListenerMetrics,
    registry: Arc<Registry>,
}

impl Default for AuthMetrics {
    /// In a registry of their own (tests, and agents no one scrapes).
    fn default() -> Self {
        let r = Registry::new();
        Self::register(&r, keyway_serve::ListenerMetrics::register(&r))
    }
}

impl AuthMetrics {
    pub fn register(r: &Arc<Registry>, listeners: keyway_serve::ListenerMetrics) -> Self {
        let m = Self {
            registry: r.clone(),
            handshakes: r.counter(
                "keyway_handshakes_total",
                "Mutual-auth handshakes, by role (dial, answer) and result (ok or the error kind).",
                &["role", "result"],
            ),
            handshake_seconds: r.histogram(
                "keyway_handshake_seconds",
                "Duration of mutual-auth handshakes, successful or not.",
                &["role"],
                LATENCY_BUCKETS,
            ),
            auth_map_entries: r.gauge(
                "keyway_auth_map_entries",
                "Mutual-auth entries this agent holds (what it writes to the auth map).",
                &[],
            ),
            handshake_log: Arc::new(LogLimiter::per_minute()),
            listeners,
        };
        m.handshakes.inc_by(&[HandshakeRole::Dial.as_str(), "ok"], 0);
        m
    }

    /// Records one handshake: `result` is `Ok` or the error kind.
    pub fn handshake(&self, role: HandshakeRole, result: Result<(), &'static str>, started: Instant) {
        let r = match result {
            Ok(()) => "ok",
            Err(kind) => kind,
        };
        self.handshakes.inc(&[role.as_str(), r]);
        self.handshake_seconds
            .observe(&[role.as_str()], started.elapsed().as_secs_f64());
    }

    /// Mirrors the number of auth entries held, at scrape time.
    pub(super) fn watch_entries(&self, entries: watch::Receiver<Arc<Vec<AuthRecord>>>) {
        let gauge = self.auth_map_entries.clone();
        self.registry
            .on_scrape(move || gauge.set(&[], entries.borrow().len() as f64));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshakes_are_counted_by_role_and_result() {
        let r = Registry::new();
        let m = AuthMetrics::register(&r, keyway_serve::ListenerMetrics::register(&r));
        m.handshake(HandshakeRole::Dial, Ok(()), Instant::now());
        m.handshake(HandshakeRole::Answer, Err("tls"), Instant::now());
        let text = r.render();
        assert!(
            text.contains("keyway_handshakes_total{role=\"dial\",result=\"ok\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("keyway_handshakes_total{role=\"answer\",result=\"tls\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("keyway_handshake_seconds_count{role=\"dial\"} 1\n"),
            "{text}"
        );
    }
}
