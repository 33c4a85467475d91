//! The datapath's metric families, read from the kernel and from the
//! loader's status at scrape time: drops by reason, missing-auth signals and
//! their queue, and the endpoints by state.

use std::sync::Arc;

use keyway_serve::telemetry::{Registry, gauge_value};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{mpsc, watch};

use super::DatapathStatus;
use super::drops::DropCounters;
use super::endpoints::Withheld;
use super::events::{MissingAuth, SignalCounts};

/// A drop reason, as `keyway_common::drop_reason::name` spells it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DropLabels {
    reason: &'static str,
}

/// What became of a missing-auth signal read from the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum SignalResult {
    Queued,
    /// Dropped: the kernel signals the pair again.
    QueueFull,
}

impl SignalResult {
    fn as_str(self) -> &'static str {
        match self {
            SignalResult::Queued => "queued",
            SignalResult::QueueFull => "queue_full",
        }
    }
}

/// Where one of this node's workload addresses is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum EndpointState {
    Placed,
    Waiting,
    Withheld,
}

impl EndpointState {
    fn as_str(self) -> &'static str {
        match self {
            EndpointState::Placed => "placed",
            EndpointState::Waiting => "waiting",
            EndpointState::Withheld => "withheld",
        }
    }
}

keyway_serve::label_values_by_as_str!(SignalResult, EndpointState);

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct SignalLabels {
    result: SignalResult,
}

/// A state, and for `withheld` why ([`Withheld::REASONS`]; empty otherwise).
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct EndpointLabels {
    state: EndpointState,
    reason: &'static str,
}

/// The datapath's families, registered whether or not the datapath runs
/// (so `/metrics` lists them either way); filled once it does. Cheap to
/// clone.
#[derive(Debug, Clone)]
pub struct DatapathMetrics {
    drops: Family<DropLabels, Counter>,
    signal_queue_depth: Gauge,
    signals: Family<SignalLabels, Counter>,
    endpoints: Family<EndpointLabels, Gauge>,
    registry: Arc<Registry>,
}

impl DatapathMetrics {
    pub fn register(r: &Arc<Registry>) -> Self {
        Self {
            drops: r.register(
                "keyway_datapath_drops",
                "Packets the datapath dropped, by reason (read from the kernel's per-CPU counters).",
                Family::default(),
            ),
            signal_queue_depth: r.register(
                "keyway_signal_queue_depth",
                "Missing-auth signals from the datapath waiting for the handshake driver.",
                Gauge::default(),
            ),
            signals: r.register(
                "keyway_datapath_signals",
                "Missing-auth signals read from the datapath, by result (queued for the handshake \
                 driver, or queue_full: dropped until the kernel signals the pair again).",
                Family::default(),
            ),
            endpoints: r.register(
                "keyway_datapath_endpoints",
                "This node's workload addresses by state: placed (in the endpoint map, judged at their \
                 interface), waiting (no interface leads to them yet: the pod is being made), or \
                 withheld (behind a bridge, refused a port; the reason label says why).",
                Family::default(),
            ),
            registry: r.clone(),
        }
    }

    /// Reads the kernel's per-CPU drop counters and the signal queue at
    /// every scrape.
    pub fn watch_drops_and_signals(
        &self,
        drops: DropCounters,
        signal_queue: mpsc::WeakSender<MissingAuth>,
        signal_counts: Arc<SignalCounts>,
    ) {
        use std::sync::atomic::Ordering::Relaxed;
        let counter = self.drops.clone();
        let depth = self.signal_queue_depth.clone();
        let signals = self.signals.clone();
        self.registry.on_scrape(move || {
            if let Ok(totals) = drops.read() {
                for (reason, total) in totals {
                    let reason = keyway_common::drop_reason::name(reason);
                    counter
                        .get_or_create(&DropLabels { reason })
                        .inner()
                        .store(total, Relaxed);
                }
            }
            let d = signal_queue
                .upgrade()
                .map(|s| s.max_capacity() - s.capacity())
                .unwrap_or(0);
            depth.set(gauge_value(d));
            for (result, n) in [
                (SignalResult::Queued, &signal_counts.queued),
                (SignalResult::QueueFull, &signal_counts.queue_full),
            ] {
                signals
                    .get_or_create(&SignalLabels { result })
                    .inner()
                    .store(n.load(Relaxed), Relaxed);
            }
        });
    }

    /// Reads the endpoint findings from the datapath's status at every
    /// scrape: a pod refused a bridge port is a page, not a log line.
    pub fn watch_endpoints(&self, status: watch::Receiver<DatapathStatus>) {
        let gauge = self.endpoints.clone();
        self.registry.on_scrape(move || {
            let s = status.borrow();
            let set = |state, reason, n: usize| {
                gauge
                    .get_or_create(&EndpointLabels { state, reason })
                    .set(gauge_value(n))
            };
            set(EndpointState::Placed, "", s.endpoints.len());
            let waiting = s
                .unresolved
                .iter()
                .filter(|ip| !s.withheld.contains_key(ip))
                .count();
            set(EndpointState::Waiting, "", waiting);
            for reason in Withheld::REASONS {
                set(
                    EndpointState::Withheld,
                    reason,
                    s.withheld.values().filter(|w| w.reason() == reason).count(),
                );
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_counted_by_state_and_why_they_are_withheld() {
        let ip = |n: u8| std::net::IpAddr::from([10, 0, 0, n]);
        let mut status = DatapathStatus::default();
        status.endpoints.insert(ip(1), Default::default());
        status.unresolved = vec![ip(2), ip(3), ip(4)];
        status
            .withheld
            .insert(ip(3), Withheld::Unbound("no selector".into()));
        status.withheld.insert(ip(4), Withheld::MacInUse("veth1".into()));
        let (_tx, rx) = watch::channel(status);
        let r = Registry::new();
        DatapathMetrics::register(&r).watch_endpoints(rx);
        let text = r.render();
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
}
