//! Mutual authentication's metric families: handshakes by role and result,
//! their duration, and the entries held.

use std::sync::Arc;
use std::time::Instant;

use keyway_serve::telemetry::{LogLimiter, Registry, gauge_value, latency_histogram};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::watch;

use super::AuthRecord;

/// Which side of a mutual-auth handshake this agent was on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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

keyway_serve::label_values_by_as_str!(HandshakeRole);

/// A handshake's role, and `ok` or the error kind.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct HandshakeLabels {
    role: HandshakeRole,
    result: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RoleLabels {
    role: HandshakeRole,
}

/// Mutual auth's metrics, registered once per registry. Cheap to clone.
#[derive(Debug, Clone)]
pub struct AuthMetrics {
    handshakes: Family<HandshakeLabels, Counter>,
    handshake_seconds: Family<RoleLabels, Histogram>,
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
            handshakes: r.register(
                "keyway_handshakes",
                "Mutual-auth handshakes, by role (dial, answer) and result (ok or the error kind).",
                Family::default(),
            ),
            handshake_seconds: r.register(
                "keyway_handshake_seconds",
                "Duration of mutual-auth handshakes, successful or not.",
                Family::new_with_constructor(latency_histogram),
            ),
            auth_map_entries: r.register(
                "keyway_auth_map_entries",
                "Mutual-auth entries this agent holds (what it writes to the auth map).",
                Gauge::default(),
            ),
            handshake_log: Arc::new(LogLimiter::per_minute()),
            listeners,
        };
        m.handshakes
            .get_or_create(&HandshakeLabels {
                role: HandshakeRole::Dial,
                result: "ok",
            })
            .inc_by(0);
        m
    }

    /// Records one handshake: `result` is `Ok` or the error kind.
    pub fn handshake(&self, role: HandshakeRole, result: Result<(), &'static str>, started: Instant) {
        let result = match result {
            Ok(()) => "ok",
            Err(kind) => kind,
        };
        self.handshakes
            .get_or_create(&HandshakeLabels { role, result })
            .inc();
        self.handshake_seconds
            .get_or_create(&RoleLabels { role })
            .observe(started.elapsed().as_secs_f64());
    }

    /// Mirrors the number of auth entries held, at scrape time.
    pub(super) fn watch_entries(&self, entries: watch::Receiver<Arc<Vec<AuthRecord>>>) {
        let gauge = self.auth_map_entries.clone();
        self.registry.on_scrape(move || {
            gauge.set(gauge_value(entries.borrow().len()));
        });
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
