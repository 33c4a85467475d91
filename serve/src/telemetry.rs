//! What `/metrics`, `/healthz` and `/readyz` read: one metrics registry per
//! process, readiness, and the limiter that keeps repeated log lines quiet.
//!
//! Metrics are the Prometheus project's own client, `prometheus-client`.
//! Each subsystem registers its families here and records into them through
//! label-set structs (`#[derive(EncodeLabelSet)]`), so a missing or
//! misspelt label fails to compile. Values that live elsewhere (a BPF map, a
//! `watch` channel) are copied in by hooks registered with
//! [`Registry::on_scrape`], run before each scrape is encoded.
//!
//! Scrapes are the Prometheus text format 0.0.4 ([`CONTENT_TYPE`]), whatever
//! the scraper's `Accept` header prefers: the crate's OpenMetrics encoder
//! spells histogram bounds `le="1.0"` where 0.0.4 has `le="1"`, and
//! Prometheus 2 stores the label as written, so serving OpenMetrics to it
//! would rename every bucket series under existing queries and dashboards.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keyway_identity::lock::Recover;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Metric;

/// Latency buckets in seconds, from 100µs to 10s: issuance and handshakes.
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A histogram over [`LATENCY_BUCKETS`]: the constructor of a histogram
/// [`Family`](prometheus_client::metrics::family::Family).
pub fn latency_histogram() -> prometheus_client::metrics::histogram::Histogram {
    prometheus_client::metrics::histogram::Histogram::new(LATENCY_BUCKETS)
}

type Hook = Box<dyn Fn() + Send + Sync>;

/// The metric families of one process. Families are registered through a
/// shared reference (each subsystem registers its own, in any order), and
/// encoded in registration order.
#[derive(Default)]
pub struct Registry {
    families: Mutex<Families>,
    hooks: Mutex<Vec<Hook>>,
}

#[derive(Default)]
struct Families {
    registry: prometheus_client::registry::Registry,
    /// The names scrapers see (a counter's with `_total`), each once.
    exposed: HashSet<String>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

impl Registry {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Registers `metric` (a counter, gauge, histogram or a `Family` of
    /// them) as `name` and hands it back for recording. A counter's `name`
    /// leaves out `_total`: the encoder adds it. `help` is one sentence; the
    /// encoder ends it with a full stop.
    ///
    /// # Panics
    /// When the exposed name is taken or is not a Prometheus metric name: a
    /// programming error, found by the first test that registers it.
    pub fn register<M: Metric + Clone>(&self, name: &str, help: &str, metric: M) -> M {
        // The sample names it writes (a histogram's all three).
        let exposed: Vec<String> = match metric.metric_type() {
            MetricType::Counter => vec![format!("{name}_total")],
            MetricType::Histogram => ["", "_bucket", "_sum", "_count"]
                .iter()
                .map(|suffix| format!("{name}{suffix}"))
                .collect(),
            _ => vec![name.to_owned()],
        };
        assert!(valid_name(name), "bad metric name {name:?}");
        let mut families = self.families.locked();
        for n in exposed {
            assert!(families.exposed.insert(n.clone()), "metric {n} registered twice");
        }
        families
            .registry
            .register(name, help.trim_end_matches('.'), Listed(metric.clone()));
        metric
    }

    /// Runs `hook` before every scrape is encoded: for values read from
    /// elsewhere (it sets gauges, or mirrors counters kept elsewhere).
    pub fn on_scrape(&self, hook: impl Fn() + Send + Sync + 'static) {
        self.hooks.locked().push(Box::new(hook));
    }

    /// Every family, current, in the text format 0.0.4. Scrapes are encoded
    /// one at a time, hooks included, so a hook may clear a family and fill
    /// it again without another scrape seeing it empty. Blocks: the endpoint
    /// calls it on the blocking pool.
    pub fn render(&self) -> String {
        let hooks = self.hooks.locked();
        for hook in hooks.iter() {
            hook();
        }
        let families = self.families.locked();
        let mut out = String::new();
        // Writing to a String cannot fail, and every value type registered
        // here encodes without error.
        let encoded = prometheus_client::encoding::prometheus_text::encode(&mut out, &families.registry);
        debug_assert!(encoded.is_ok(), "encoding metrics failed: {encoded:?}");
        out
    }
}

/// A count or a timestamp as an integer gauge's value, saturating.
pub fn gauge_value(n: impl TryInto<i64>) -> i64 {
    n.try_into().unwrap_or(i64::MAX)
}

/// The content type of [`Registry::render`].
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Implements `EncodeLabelValue` for enums with an `as_str(self) -> &'static str`,
/// the label values they are spelt as.
#[macro_export]
macro_rules! label_values_by_as_str {
    ($($t:ty),* $(,)?) => {$(
        impl ::prometheus_client::encoding::EncodeLabelValue for $t {
            fn encode(&self, e: &mut ::prometheus_client::encoding::LabelValueEncoder) -> ::std::fmt::Result {
                ::std::fmt::Write::write_str(e, self.as_str())
            }
        }
    )*};
}

/// A family that is listed (its `# HELP` and `# TYPE`) even while it has no
/// series, as before its first one (an agent that holds no SVID yet): the
/// names a dashboard or alert looks for are there either way.
#[derive(Debug)]
struct Listed<M>(M);

impl<M: EncodeMetric> EncodeMetric for Listed<M> {
    fn encode(&self, encoder: MetricEncoder) -> std::fmt::Result {
        self.0.encode(encoder)
    }

    fn metric_type(&self) -> MetricType {
        self.0.metric_type()
    }

    fn is_empty(&self) -> bool {
        false
    }
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// Which components have reported ready. `/readyz` answers 200 only when
/// all of them have.
#[derive(Debug, Default)]
pub struct Readiness {
    components: Mutex<Vec<(String, bool)>>,
}

impl Readiness {
    /// Readiness waiting on `components`, none ready yet.
    pub fn new(components: &[&str]) -> Arc<Self> {
        Arc::new(Self {
            components: Mutex::new(components.iter().map(|c| ((*c).to_owned(), false)).collect()),
        })
    }

    /// Adds a component to wait for (one only some configurations have).
    pub fn expect(&self, component: &str) {
        let mut c = self.components.locked();
        if !c.iter().any(|(n, _)| n == component) {
            c.push((component.to_owned(), false));
        }
    }

    pub fn set_ready(&self, component: &str) {
        let mut c = self.components.locked();
        match c.iter_mut().find(|(n, _)| n == component) {
            Some((_, ready)) => *ready = true,
            None => c.push((component.to_owned(), true)),
        }
    }

    /// Every component and whether it is ready, in registration order.
    pub fn components(&self) -> Vec<(String, bool)> {
        self.components.locked().clone()
    }

    /// The components not ready yet, in registration order.
    pub fn not_ready(&self) -> Vec<String> {
        self.components()
            .into_iter()
            .filter(|(_, r)| !r)
            .map(|(n, _)| n)
            .collect()
    }
}

/// Decides which repeats of a log line are worth a `warn`: the first time a
/// key (peer and reason) is seen, then at most once per `interval` per key;
/// callers log the rest at `debug`. Bounded: when full, it forgets everything
/// (which only means one extra warning per key).
#[derive(Debug)]
pub struct LogLimiter {
    interval: Duration,
    seen: Mutex<std::collections::HashMap<String, Instant>>,
}

impl LogLimiter {
    const MAX_KEYS: usize = 4096;

    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            seen: Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// One line per minute per key.
    pub fn per_minute() -> Self {
        Self::new(Duration::from_secs(60))
    }

    /// Whether this occurrence of `key` should be logged loudly.
    pub fn should_warn(&self, key: &str) -> bool {
        self.should_warn_at(key, Instant::now())
    }

    fn should_warn_at(&self, key: &str, now: Instant) -> bool {
        let mut seen = self.seen.locked();
        if let Some(last) = seen.get(key)
            && now.saturating_duration_since(*last) < self.interval
        {
            return false;
        }
        if seen.len() >= Self::MAX_KEYS {
            seen.clear();
        }
        seen.insert(key.to_owned(), now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::EncodeLabelSet;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::gauge::Gauge;
    use prometheus_client::metrics::histogram::Histogram;

    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    enum Kind {
        ControlPlane,
    }

    impl Kind {
        fn as_str(self) -> &'static str {
            match self {
                Kind::ControlPlane => "control-plane",
            }
        }
    }

    crate::label_values_by_as_str!(Kind);

    #[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
    struct KindLabels {
        kind: Kind,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
    struct IdLabels {
        spiffe_id: String,
    }

    #[test]
    fn text_format_names_counters_with_total_and_escapes_label_values() {
        let r = Registry::new();
        let c = r.register(
            "keyway_things",
            "Things.\nSecond line \\ here.",
            Family::<KindLabels, Counter>::default(),
        );
        c.get_or_create(&KindLabels {
            kind: Kind::ControlPlane,
        })
        .inc();
        let ids = r.register("keyway_ids", "Ids.", Family::<IdLabels, Gauge>::default());
        ids.get_or_create(&IdLabels {
            spiffe_id: "we\"ird\\\n".into(),
        })
        .set(3);
        assert_eq!(
            r.render(),
            "# HELP keyway_things_total Things.\\nSecond line \\\\ here.\n\
             # TYPE keyway_things_total counter\n\
             keyway_things_total{kind=\"control-plane\"} 1\n\
             # HELP keyway_ids Ids.\n\
             # TYPE keyway_ids gauge\n\
             keyway_ids{spiffe_id=\"we\\\"ird\\\\\\n\"} 3\n"
        );
    }

    #[test]
    fn unlabelled_metrics_exist_from_the_start_and_empty_families_are_listed() {
        let r = Registry::new();
        let _c = r.register("keyway_a", "A.", Counter::<u64>::default());
        let g = r.register(
            "keyway_b",
            "B.",
            Gauge::<f64, std::sync::atomic::AtomicU64>::default(),
        );
        let _ids = r.register("keyway_c", "C.", Family::<IdLabels, Gauge>::default());
        let text = r.render();
        assert!(text.contains("\nkeyway_a_total 0\n"), "{text}");
        assert!(text.contains("# TYPE keyway_c gauge\n"), "{text}");
        g.set(1.5);
        g.inc_by(-3.0);
        assert!(r.render().contains("\nkeyway_b -1.5\n"));
    }

    #[test]
    fn series_go_when_removed_or_cleared_and_the_family_stays_listed() {
        let r = Registry::new();
        let g = r.register(
            "keyway_expiry_timestamp_seconds",
            "E.",
            Family::<IdLabels, Gauge>::default(),
        );
        let id = |s: &str| IdLabels { spiffe_id: s.into() };
        g.get_or_create(&id("spiffe://td/a")).set(1_700_000_000);
        g.get_or_create(&id("spiffe://td/b")).set(2);
        g.remove(&id("spiffe://td/a"));
        let text = r.render();
        assert!(!text.contains("td/a"), "{text}");
        assert!(
            text.contains("keyway_expiry_timestamp_seconds{spiffe_id=\"spiffe://td/b\"} 2\n"),
            "{text}"
        );
        g.clear();
        assert_eq!(
            r.render(),
            "# HELP keyway_expiry_timestamp_seconds E.\n# TYPE keyway_expiry_timestamp_seconds gauge\n"
        );
    }

    #[test]
    fn histograms_render_cumulative_buckets_sum_and_count() {
        let r = Registry::new();
        let h = r.register(
            "keyway_op_seconds",
            "Op.",
            Family::<KindLabels, Histogram>::new_with_constructor(|| Histogram::new([0.1, 1.0])),
        );
        let ok = KindLabels {
            kind: Kind::ControlPlane,
        };
        for v in [0.05, 0.1, 0.5, 7.0] {
            h.get_or_create(&ok).observe(v);
        }
        let text = r.render();
        for line in [
            "keyway_op_seconds_bucket{kind=\"control-plane\",le=\"0.1\"} 2\n",
            "keyway_op_seconds_bucket{kind=\"control-plane\",le=\"1\"} 3\n",
            "keyway_op_seconds_bucket{kind=\"control-plane\",le=\"+Inf\"} 4\n",
            "keyway_op_seconds_sum{kind=\"control-plane\"} 7.65\n",
            "keyway_op_seconds_count{kind=\"control-plane\"} 4\n",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
    }

    #[test]
    fn hooks_run_at_scrape_time() {
        let r = Registry::new();
        let c = r.register("keyway_drops", "D.", Counter::<u64>::default());
        let n = Arc::new(std::sync::atomic::AtomicU64::new(0));
        r.on_scrape({
            let n = n.clone();
            move || {
                c.inner().store(
                    n.load(std::sync::atomic::Ordering::Relaxed),
                    std::sync::atomic::Ordering::Relaxed,
                )
            }
        });
        n.store(42, std::sync::atomic::Ordering::Relaxed);
        assert!(r.render().contains("keyway_drops_total 42\n"));
    }

    #[test]
    #[should_panic(expected = "keyway_x_total registered twice")]
    fn exposed_names_are_unique() {
        let r = Registry::new();
        r.register("keyway_x", "X.", Counter::<u64>::default());
        r.register("keyway_x_total", "X.", Gauge::<i64>::default());
    }

    #[test]
    #[should_panic(expected = "keyway_op_seconds_count registered twice")]
    fn a_histograms_sample_names_are_taken_too() {
        let r = Registry::new();
        r.register("keyway_op_seconds", "Op.", Histogram::new([1.0]));
        r.register("keyway_op_seconds_count", "Ops.", Gauge::<i64>::default());
    }

    #[test]
    fn log_limiter_warns_once_per_key_and_interval() {
        let l = LogLimiter::new(Duration::from_secs(60));
        let t0 = Instant::now();
        assert!(l.should_warn_at("peer-a/bad_csr", t0));
        assert!(!l.should_warn_at("peer-a/bad_csr", t0 + Duration::from_secs(59)));
        assert!(l.should_warn_at("peer-b/bad_csr", t0 + Duration::from_secs(59)));
        assert!(l.should_warn_at("peer-a/bad_csr", t0 + Duration::from_secs(60)));
    }

    #[test]
    fn readiness_lists_what_is_missing() {
        let r = Readiness::new(&["store", "ca"]);
        assert_eq!(r.not_ready(), vec!["store", "ca"]);
        r.set_ready("store");
        r.expect("caches");
        assert_eq!(r.not_ready(), vec!["ca", "caches"]);
        r.set_ready("ca");
        r.set_ready("caches");
        assert!(r.not_ready().is_empty());
    }
}
