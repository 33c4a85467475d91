//! The node agent's Prometheus metrics (`keyway_` prefix) and the readiness
//! components `/readyz` waits for.
//!
//! Most values are owned elsewhere and read at scrape time from the `watch`
//! channels that already publish them (SVIDs held, rotations, auth entries)
//! or from the kernel (drop counters); only events (handshakes, streams) are
//! recorded where they happen.

use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use keyway_identity::metrics::{Counter, Gauge, Histogram, LATENCY_BUCKETS, LogLimiter, Readiness, Registry};
use tokio::sync::watch;

use crate::agent::AgentHandles;
use crate::mutual_auth::AuthRecord;

/// Readiness components of the agent.
pub const READY_NODE_SVID: &str = "node_svid";
pub const READY_FIRST_SYNC: &str = "first_sync";
pub const READY_WORKLOAD_API: &str = "workload_api";
/// Only with `--datapath`.
pub const READY_DATAPATH: &str = "datapath";

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

/// The agent's metric families. Cheap to clone.
#[derive(Debug, Clone)]
pub struct AgentMetrics {
    pub registry: Arc<Registry>,
    pub readiness: Arc<Readiness>,
    handshakes: Counter,
    handshake_seconds: Histogram,
    workload_api_streams: Gauge,
    svid_expiry: Gauge,
    svid_rotations: Counter,
    auth_map_entries: Gauge,
    drops: Counter,
    signal_queue_depth: Gauge,
    signals: Counter,
    endpoints: Gauge,
    sync_lag: Gauge,
    sync_last_applied: Gauge,
    /// Failed handshakes answered for peers are logged once per peer and
    /// reason per minute.
    pub handshake_log: Arc<LogLimiter>,
    /// Every listener's connections, refusals and closes.
    pub listeners: keyway_serve::ListenerMetrics,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new(
            Registry::new(),
            Readiness::new(&[READY_NODE_SVID, READY_FIRST_SYNC, READY_WORKLOAD_API]),
        )
    }
}

impl AgentMetrics {
    pub fn new(registry: Arc<Registry>, readiness: Arc<Readiness>) -> Self {
        let r = &registry;
        let m = Self {
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
            workload_api_streams: r.gauge(
                "keyway_workload_api_streams",
                "Open Workload API streams (X.509 SVIDs, bundles, JWT bundles).",
                &[],
            ),
            svid_expiry: r.gauge(
                "keyway_svid_expiry_timestamp_seconds",
                "When each workload X509-SVID this agent holds expires (Unix seconds).",
                &["spiffe_id"],
            ),
            svid_rotations: r.counter(
                "keyway_svid_rotations_total",
                "Workload X509-SVIDs renewed (replaced before expiry).",
                &[],
            ),
            auth_map_entries: r.gauge(
                "keyway_auth_map_entries",
                "Mutual-auth entries this agent holds (what it writes to the auth map).",
                &[],
            ),
            drops: r.counter(
                "keyway_datapath_drops_total",
                "Packets the datapath dropped, by reason (read from the kernel's per-CPU counters).",
                &["reason"],
            ),
            signal_queue_depth: r.gauge(
                "keyway_signal_queue_depth",
                "Missing-auth signals from the datapath waiting for the handshake driver.",
                &[],
            ),
            signals: r.counter(
                "keyway_datapath_signals_total",
                "Missing-auth signals read from the datapath, by result (queued for the handshake \
                 driver, or queue_full: dropped until the kernel signals the pair again).",
                &["result"],
            ),
            endpoints: r.gauge(
                "keyway_datapath_endpoints",
                "This node's workload addresses by state: placed (in the endpoint map, judged at their \
                 interface), waiting (no interface leads to them yet: the pod is being made), or \
                 withheld (behind a bridge, refused a port; the reason label says why).",
                &["state", "reason"],
            ),
            sync_lag: r.gauge(
                "keyway_sync_lag_seconds",
                "0 while the Sync stream is connected and its last complete update is applied; \
                 otherwise seconds since this agent's view was last known current (the connection \
                 loss, or start-up before the first complete snapshot).",
                &[],
            ),
            sync_last_applied: r.gauge(
                "keyway_sync_last_applied_timestamp_seconds",
                "When the last complete Sync update was applied (Unix seconds; 0 before the first).",
                &[],
            ),
            handshake_log: Arc::new(LogLimiter::per_minute()),
            listeners: keyway_serve::ListenerMetrics::register(r),
            registry,
            readiness,
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

    /// Counts an open Workload API stream until the guard drops.
    pub fn workload_stream(&self) -> StreamGuard {
        self.workload_api_streams.add(&[], 1.0);
        StreamGuard(self.workload_api_streams.clone())
    }

    /// Follows what the agent core publishes: SVIDs held and their
    /// rotations (read at scrape time), the node SVID (held once `handles`
    /// exist), the first complete Sync and the sync lag.
    pub fn watch_agent(&self, handles: &AgentHandles, shutdown: watch::Receiver<bool>) {
        self.readiness.set_ready(READY_NODE_SVID);
        let svids = handles.svids.clone();
        let expiry = self.svid_expiry.clone();
        self.registry.on_scrape(move || {
            let held = svids.borrow().clone();
            expiry.retain(|labels| held.contains_key(&labels[0]));
            for (id, svid) in held.iter() {
                let at = svid
                    .not_after()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or(0.0);
                expiry.set(&[id], at);
            }
        });
        // A rotation is a held SVID replaced by a newer one for the same ID
        // (first issuances are not rotations).
        let rotated = self.svid_rotations.clone();
        let mut svids = handles.svids.clone();
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            let mut held = svids.borrow_and_update().clone();
            loop {
                tokio::select! {
                    r = svids.changed() => if r.is_err() { return },
                    _ = stop.changed() => return,
                }
                let next = svids.borrow_and_update().clone();
                let renewed = next
                    .iter()
                    .filter(|(id, svid)| held.get(*id).is_some_and(|old| old.serial() != svid.serial()))
                    .count();
                rotated.inc_by(&[], renewed as u64);
                held = next;
            }
        });
        let lag = Arc::new(Mutex::new(SyncLag::new(Instant::now())));
        let gauge = self.sync_lag.clone();
        self.registry.on_scrape({
            let lag = lag.clone();
            move || {
                let secs = lag
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .seconds(Instant::now());
                gauge.set(&[], secs);
            }
        });
        let readiness = self.readiness.clone();
        let last_applied = self.sync_last_applied.clone();
        let mut state = handles.state.clone();
        let mut client = handles.client.clone();
        let mut shutdown = shutdown;
        tokio::spawn(async move {
            loop {
                let connected = client.borrow_and_update().is_some();
                {
                    let mut l = lag.lock().unwrap_or_else(|e| e.into_inner());
                    l.connection(connected, Instant::now());
                }
                tokio::select! {
                    r = state.changed() => {
                        if r.is_err() { return; }
                        if state.borrow_and_update().synced {
                            readiness.set_ready(READY_FIRST_SYNC);
                            let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
                            last_applied.set(&[], now);
                            let connected = client.borrow().is_some();
                            lag.lock().unwrap_or_else(|e| e.into_inner()).applied(connected);
                        }
                    }
                    r = client.changed() => if r.is_err() { return },
                    _ = shutdown.changed() => return,
                }
            }
        });
    }

    /// Mirrors the number of auth entries the agent holds, at scrape time.
    pub fn watch_auth_entries(&self, entries: watch::Receiver<Arc<Vec<AuthRecord>>>) {
        let gauge = self.auth_map_entries.clone();
        self.registry
            .on_scrape(move || gauge.set(&[], entries.borrow().len() as f64));
    }

    /// Reads the datapath's per-CPU drop counters and the signal queue at
    /// scrape time.
    pub fn watch_datapath(
        &self,
        drops: crate::datapath::drops::DropCounters,
        signal_queue: tokio::sync::mpsc::WeakSender<crate::datapath::events::MissingAuth>,
        signal_counts: Arc<crate::datapath::events::SignalCounts>,
    ) {
        use std::sync::atomic::Ordering::Relaxed;
        let counter = self.drops.clone();
        let depth = self.signal_queue_depth.clone();
        let signals = self.signals.clone();
        self.registry.on_scrape(move || {
            if let Ok(totals) = drops.read() {
                for (reason, total) in totals {
                    counter.set_total(&[keyway_common::drop_reason::name(reason)], total);
                }
            }
            let d = signal_queue
                .upgrade()
                .map(|s| s.max_capacity() - s.capacity())
                .unwrap_or(0);
            depth.set(&[], d as f64);
            signals.set_total(&["queued"], signal_counts.queued.load(Relaxed));
            signals.set_total(&["queue_full"], signal_counts.queue_full.load(Relaxed));
        });
    }
}

impl AgentMetrics {
    /// Reads the datapath's endpoint findings from its status at every
    /// scrape: a pod refused a bridge port is a page, not a log line.
    pub fn watch_endpoints(&self, status: watch::Receiver<crate::datapath::DatapathStatus>) {
        let gauge = self.endpoints.clone();
        self.registry.on_scrape(move || {
            let s = status.borrow();
            gauge.set(&["placed", ""], s.endpoints.len() as f64);
            let waiting = s
                .unresolved
                .iter()
                .filter(|ip| !s.withheld.contains_key(ip))
                .count();
            gauge.set(&["waiting", ""], waiting as f64);
            for reason in crate::datapath::endpoints::Withheld::REASONS {
                let n = s.withheld.values().filter(|w| w.reason() == reason).count();
                gauge.set(&["withheld", reason], n as f64);
            }
        });
    }
}

/// One open Workload API stream (see [`AgentMetrics::workload_stream`]).
#[derive(Debug)]
pub struct StreamGuard(Gauge);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.add(&[], -1.0);
    }
}

/// The sync lag's definition, sans-IO: the view is *current* while the
/// Sync stream is connected and its latest complete update was applied
/// (the control plane pushes every change, so nothing is missing); it goes
/// stale when the connection drops, and is stale from start-up until the
/// first complete snapshot. The lag is how long it has been stale.
#[derive(Debug, Clone, Copy)]
struct SyncLag {
    current: bool,
    stale_since: Instant,
}

impl SyncLag {
    fn new(start: Instant) -> Self {
        Self {
            current: false,
            stale_since: start,
        }
    }

    fn connection(&mut self, connected: bool, now: Instant) {
        if !connected && self.current {
            self.current = false;
            self.stale_since = now;
        }
    }

    fn applied(&mut self, connected: bool) {
        if connected {
            self.current = true;
        }
    }

    fn seconds(&self, now: Instant) -> f64 {
        if self.current {
            0.0
        } else {
            now.duration_since(self.stale_since).as_secs_f64()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn sync_lag_counts_from_start_up_then_from_the_connection_loss() {
        let t0 = Instant::now();
        let s = |n: u64| t0 + Duration::from_secs(n);
        let mut l = SyncLag::new(t0);
        assert_eq!(l.seconds(s(3)), 3.0, "stale until the first snapshot");
        l.connection(true, s(3));
        assert_eq!(l.seconds(s(4)), 4.0, "connected is not enough");
        l.applied(true);
        assert_eq!(l.seconds(s(100)), 0.0, "connected and applied: current");
        l.connection(false, s(100));
        assert_eq!(l.seconds(s(130)), 30.0);
        l.connection(true, s(131));
        assert_eq!(
            l.seconds(s(132)),
            32.0,
            "reconnected, new snapshot not applied yet"
        );
        l.applied(true);
        assert_eq!(l.seconds(s(140)), 0.0);
    }

    #[test]
    fn endpoints_are_counted_by_state_and_why_they_are_withheld() {
        use crate::datapath::endpoints::Withheld;
        let ip = |n: u8| std::net::IpAddr::from([10, 0, 0, n]);
        let mut status = crate::datapath::DatapathStatus::default();
        status.endpoints.insert(ip(1), Default::default());
        status.unresolved = vec![ip(2), ip(3), ip(4)];
        status
            .withheld
            .insert(ip(3), Withheld::Unbound("no selector".into()));
        status.withheld.insert(ip(4), Withheld::MacInUse("veth1".into()));
        let (_tx, rx) = watch::channel(status);
        let m = AgentMetrics::default();
        m.watch_endpoints(rx);
        let text = m.registry.render();
        for line in [
            "keyway_datapath_endpoints{state=\"placed\",reason=\"\"} 1\n",
            "keyway_datapath_endpoints{state=\"waiting\",reason=\"\"} 1\n",
            "keyway_datapath_endpoints{state=\"withheld\",reason=\"unbound\"} 1\n",
            "keyway_datapath_endpoints{state=\"withheld\",reason=\"mac-in-use\"} 1\n",
            "keyway_datapath_endpoints{state=\"withheld\",reason=\"several-ports\"} 0\n",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
    }

    #[test]
    fn handshakes_are_counted_by_role_and_result() {
        let m = AgentMetrics::default();
        m.handshake(HandshakeRole::Dial, Ok(()), Instant::now());
        m.handshake(HandshakeRole::Answer, Err("tls"), Instant::now());
        let text = m.registry.render();
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
        let g = m.workload_stream();
        assert!(m.registry.render().contains("keyway_workload_api_streams 1\n"));
        drop(g);
        assert!(m.registry.render().contains("keyway_workload_api_streams 0\n"));
    }
}
