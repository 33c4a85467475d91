//! The datapath's metric families, read from the kernel and from the
//! loader's status at scrape time: drops by reason, missing-auth signals and
//! their queue, and the endpoints by state.

use std::sync::Arc;

use keyway_identity::metrics::{Counter, Gauge, Registry};
use tokio::sync::{mpsc, watch};

use super::DatapathStatus;
use super::drops::DropCounters;
use super::endpoints::Withheld;
use super::events::{MissingAuth, SignalCounts};

/// The datapath's families, registered whether or not the datapath runs
/// (so `/metrics` lists them either way); filled once it does. Cheap to
/// clone.
#[derive(Debug, Clone)]
pub struct DatapathMetrics {
    drops: Counter,
    signal_queue_depth: Gauge,
    signals: Counter,
    endpoints: Gauge,
    registry: Arc<Registry>,
}

impl DatapathMetrics {
    pub fn register(r: &Arc<Registry>) -> Self {
        Self {
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

    /// Reads the endpoint findings from the datapath's status at every
    /// scrape: a pod refused a bridge port is a page, not a log line.
    pub fn watch_endpoints(&self, status: watch::Receiver<DatapathStatus>) {
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
            for reason in Withheld::REASONS {
                let n = s.withheld.values().filter(|w| w.reason() == reason).count();
                gauge.set(&["withheld", reason], n as f64);
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
