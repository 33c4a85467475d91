//! Prometheus metrics and readiness, shared by both binaries so they render
//! one exposition format (text format 0.0.4) the same way.
//!
//! Deliberately small instead of the `prometheus` crate: counters, gauges and
//! fixed-bucket histograms, each a family with a fixed list of label names;
//! values are atomics, so recording never takes a lock held across `.await`.
//! Values that live elsewhere (a BPF map, a `watch` channel) are read at
//! scrape time by collectors registered with [`Registry::on_scrape`].
//!
//! The HTTP side (`/metrics`, `/healthz`, `/readyz`) is `keyway_serve::http`.

use crate::lock::Recover;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Latency buckets in seconds, from 100µs to 10s: issuance and handshakes.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

type Collector = Box<dyn Fn() + Send + Sync>;

/// All metric families of one process, rendered in registration order.
#[derive(Default)]
pub struct Registry {
    families: Mutex<Vec<Arc<dyn Family>>>,
    collectors: Mutex<Vec<Collector>>,
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

    pub fn counter(&self, name: &str, help: &str, labels: &[&str]) -> Counter {
        let f = Arc::new(Metric::<CounterValue>::new(name, help, labels, ()));
        self.add(f.clone());
        Counter(f)
    }

    pub fn gauge(&self, name: &str, help: &str, labels: &[&str]) -> Gauge {
        let f = Arc::new(Metric::<GaugeValue>::new(name, help, labels, ()));
        self.add(f.clone());
        Gauge(f)
    }

    /// A histogram with the given upper bounds (ascending; `+Inf` is implied).
    pub fn histogram(&self, name: &str, help: &str, labels: &[&str], buckets: &[f64]) -> Histogram {
        let f = Arc::new(Metric::<HistogramValue>::new(
            name,
            help,
            labels,
            buckets.to_vec(),
        ));
        self.add(f.clone());
        Histogram(f)
    }

    /// Runs `f` before every render: for values read from elsewhere at
    /// scrape time (it sets gauges or mirrors counters).
    pub fn on_scrape(&self, f: impl Fn() + Send + Sync + 'static) {
        self.collectors.locked().push(Box::new(f));
    }

    fn add(&self, f: Arc<dyn Family>) {
        let mut families = self.families.locked();
        assert!(
            !families.iter().any(|g| g.name() == f.name()),
            "metric {} registered twice",
            f.name()
        );
        families.push(f);
    }

    /// The text exposition format 0.0.4.
    pub fn render(&self) -> String {
        for c in self.collectors.locked().iter() {
            c();
        }
        let families = self.families.locked().clone();
        let mut out = String::new();
        for f in families {
            f.render(&mut out);
        }
        out
    }
}

/// The content type of [`Registry::render`].
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

trait Family: Send + Sync {
    fn name(&self) -> &str;
    fn render(&self, out: &mut String);
}

trait Value: Default + Send + Sync + 'static {
    type Config: Send + Sync + 'static;
    const TYPE: &'static str;
    fn with_config(config: &Self::Config) -> Self;
    fn render(&self, name: &str, labels: &str, config: &Self::Config, out: &mut String);
}

struct Metric<V: Value> {
    name: String,
    help: String,
    label_names: Vec<String>,
    config: V::Config,
    series: Mutex<BTreeMap<Vec<String>, Arc<V>>>,
}

impl<V: Value> Metric<V> {
    fn new(name: &str, help: &str, labels: &[&str], config: V::Config) -> Self {
        assert!(valid_name(name), "bad metric name {name:?}");
        for l in labels {
            assert!(
                valid_name(l) && !l.contains(':') && *l != "le",
                "bad label name {l:?}"
            );
        }
        let m = Self {
            name: name.to_owned(),
            help: help.to_owned(),
            label_names: labels.iter().map(|s| (*s).to_owned()).collect(),
            config,
            series: Mutex::new(BTreeMap::new()),
        };
        // An unlabelled metric exists from the start (reads as 0).
        if labels.is_empty() {
            m.get(&[]);
        }
        m
    }

    fn get(&self, values: &[&str]) -> Arc<V> {
        assert_eq!(
            values.len(),
            self.label_names.len(),
            "metric {} takes labels {:?}",
            self.name,
            self.label_names
        );
        let key: Vec<String> = values.iter().map(|s| (*s).to_owned()).collect();
        self.series
            .locked()
            .entry(key)
            .or_insert_with(|| Arc::new(V::with_config(&self.config)))
            .clone()
    }

    fn remove(&self, values: &[&str]) {
        let key: Vec<String> = values.iter().map(|s| (*s).to_owned()).collect();
        self.series.locked().remove(&key);
    }

    fn retain(&self, mut keep: impl FnMut(&[String]) -> bool) {
        self.series.locked().retain(|k, _| keep(k));
    }
}

impl<V: Value> Family for Metric<V> {
    fn name(&self) -> &str {
        &self.name
    }

    fn render(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP {} {}", self.name, escape_help(&self.help));
        let _ = writeln!(out, "# TYPE {} {}", self.name, V::TYPE);
        let series: Vec<(Vec<String>, Arc<V>)> = self
            .series
            .locked()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (values, v) in series {
            let labels = self
                .label_names
                .iter()
                .zip(&values)
                .map(|(n, v)| format!("{n}=\"{}\"", escape_label(v)))
                .collect::<Vec<_>>()
                .join(",");
            v.render(&self.name, &labels, &self.config, out);
        }
    }
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// Label values escape backslash, double quote and newline.
fn escape_label(v: &str) -> String {
    v.replace('\\', r"\\").replace('"', r#"\""#).replace('\n', r"\n")
}

/// HELP text escapes backslash and newline.
fn escape_help(v: &str) -> String {
    v.replace('\\', r"\\").replace('\n', r"\n")
}

fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        format!("{v}")
    }
}

fn braces(labels: &str) -> String {
    if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    }
}

#[derive(Default)]
struct CounterValue(AtomicU64);

impl Value for CounterValue {
    type Config = ();
    const TYPE: &'static str = "counter";
    fn with_config(_: &()) -> Self {
        Self::default()
    }
    fn render(&self, name: &str, labels: &str, _: &(), out: &mut String) {
        let _ = writeln!(out, "{name}{} {}", braces(labels), self.0.load(Ordering::Relaxed));
    }
}

/// An f64 in an atomic (its bits).
#[derive(Default)]
struct GaugeValue(AtomicU64);

impl GaugeValue {
    fn update(&self, f: impl Fn(f64) -> f64) {
        let _ = self.0.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
            Some(f(f64::from_bits(bits)).to_bits())
        });
    }
    fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

impl Value for GaugeValue {
    type Config = ();
    const TYPE: &'static str = "gauge";
    fn with_config(_: &()) -> Self {
        Self::default()
    }
    fn render(&self, name: &str, labels: &str, _: &(), out: &mut String) {
        let _ = writeln!(out, "{name}{} {}", braces(labels), format_value(self.get()));
    }
}

#[derive(Default)]
struct HistogramValue {
    /// Per bucket, not cumulative; the last one is `+Inf`.
    buckets: Vec<AtomicU64>,
    sum: GaugeValue,
    count: AtomicU64,
}

impl Value for HistogramValue {
    type Config = Vec<f64>;
    const TYPE: &'static str = "histogram";
    fn with_config(bounds: &Vec<f64>) -> Self {
        Self {
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            ..Self::default()
        }
    }
    fn render(&self, name: &str, labels: &str, bounds: &Vec<f64>, out: &mut String) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            cumulative += b.load(Ordering::Relaxed);
            let le = bounds.get(i).map_or("+Inf".to_owned(), |b| format_value(*b));
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}");
        }
        let _ = writeln!(
            out,
            "{name}_sum{} {}",
            braces(labels),
            format_value(self.sum.get())
        );
        let _ = writeln!(out, "{name}_count{} {cumulative}", braces(labels));
    }
}

/// A counter family. `with` selects one series by label values (in the
/// order the family was registered with).
#[derive(Clone)]
pub struct Counter(Arc<Metric<CounterValue>>);

impl std::fmt::Debug for Counter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Counter").field(&self.0.name).finish()
    }
}

impl Counter {
    pub fn inc(&self, labels: &[&str]) {
        self.inc_by(labels, 1);
    }

    pub fn inc_by(&self, labels: &[&str], n: u64) {
        self.0.get(labels).0.fetch_add(n, Ordering::Relaxed);
    }

    /// Mirrors a total counted elsewhere (a kernel map read at scrape time).
    pub fn set_total(&self, labels: &[&str], total: u64) {
        self.0.get(labels).0.store(total, Ordering::Relaxed);
    }

    pub fn get(&self, labels: &[&str]) -> u64 {
        self.0.get(labels).0.load(Ordering::Relaxed)
    }
}

/// A gauge family.
#[derive(Clone)]
pub struct Gauge(Arc<Metric<GaugeValue>>);

impl std::fmt::Debug for Gauge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Gauge").field(&self.0.name).finish()
    }
}

impl Gauge {
    pub fn set(&self, labels: &[&str], v: f64) {
        self.0.get(labels).0.store(v.to_bits(), Ordering::Relaxed);
    }

    pub fn add(&self, labels: &[&str], d: f64) {
        self.0.get(labels).update(|v| v + d);
    }

    pub fn get(&self, labels: &[&str]) -> f64 {
        self.0.get(labels).get()
    }

    /// Drops one series (an SVID no longer held).
    pub fn remove(&self, labels: &[&str]) {
        self.0.remove(labels);
    }

    /// Keeps only the series whose label values `keep` accepts.
    pub fn retain(&self, keep: impl FnMut(&[String]) -> bool) {
        self.0.retain(keep);
    }
}

/// A histogram family with fixed buckets.
#[derive(Clone)]
pub struct Histogram(Arc<Metric<HistogramValue>>);

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Histogram").field(&self.0.name).finish()
    }
}

impl Histogram {
    pub fn observe(&self, labels: &[&str], v: f64) {
        let h = self.0.get(labels);
        let i = self
            .0
            .config
            .iter()
            .position(|b| v <= *b)
            .unwrap_or(self.0.config.len());
        h.buckets[i].fetch_add(1, Ordering::Relaxed);
        h.sum.update(|s| s + v);
        h.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self, labels: &[&str]) -> u64 {
        self.0.get(labels).count.load(Ordering::Relaxed)
    }
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
    interval: std::time::Duration,
    seen: Mutex<std::collections::HashMap<String, std::time::Instant>>,
}

impl LogLimiter {
    const MAX_KEYS: usize = 4096;

    pub fn new(interval: std::time::Duration) -> Self {
        Self {
            interval,
            seen: Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// One line per minute per key.
    pub fn per_minute() -> Self {
        Self::new(std::time::Duration::from_secs(60))
    }

    /// Whether this occurrence of `key` should be logged loudly.
    pub fn should_warn(&self, key: &str) -> bool {
        let now = std::time::Instant::now();
        let mut seen = self.seen.locked();
        if let Some(last) = seen.get(key)
            && now.duration_since(*last) < self.interval
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

    #[test]
    fn counters_render_help_type_and_escaped_labels() {
        let r = Registry::new();
        let c = r.counter("keyway_things_total", "Things.\nSecond line \\ here.", &["kind"]);
        c.inc(&["a"]);
        c.inc_by(&["we\"ird\\\n"], 3);
        let text = r.render();
        assert_eq!(
            text,
            "# HELP keyway_things_total Things.\\nSecond line \\\\ here.\n\
             # TYPE keyway_things_total counter\n\
             keyway_things_total{kind=\"a\"} 1\n\
             keyway_things_total{kind=\"we\\\"ird\\\\\\n\"} 3\n"
        );
    }

    #[test]
    fn unlabelled_metrics_exist_from_the_start() {
        let r = Registry::new();
        let _c = r.counter("keyway_a_total", "A.", &[]);
        let g = r.gauge("keyway_b", "B.", &[]);
        assert_eq!(
            r.render(),
            "# HELP keyway_a_total A.\n# TYPE keyway_a_total counter\nkeyway_a_total 0\n\
             # HELP keyway_b B.\n# TYPE keyway_b gauge\nkeyway_b 0\n"
        );
        g.set(&[], 1.5);
        g.add(&[], -3.0);
        assert!(r.render().contains("\nkeyway_b -1.5\n"));
    }

    #[test]
    fn gauges_drop_series() {
        let r = Registry::new();
        let g = r.gauge("keyway_expiry_timestamp_seconds", "E.", &["spiffe_id"]);
        g.set(&["spiffe://td/a"], 1700000000.0);
        g.set(&["spiffe://td/b"], 2.0);
        g.remove(&["spiffe://td/a"]);
        let text = r.render();
        assert!(!text.contains("td/a"));
        assert!(text.contains("keyway_expiry_timestamp_seconds{spiffe_id=\"spiffe://td/b\"} 2\n"));
        g.retain(|_| false);
        assert!(!r.render().contains("td/b"));
    }

    #[test]
    fn histograms_render_cumulative_buckets_sum_and_count() {
        let r = Registry::new();
        let h = r.histogram("keyway_op_seconds", "Op.", &["result"], &[0.1, 1.0]);
        h.observe(&["ok"], 0.05);
        h.observe(&["ok"], 0.1);
        h.observe(&["ok"], 0.5);
        h.observe(&["ok"], 7.0);
        assert_eq!(h.count(&["ok"]), 4);
        assert_eq!(
            r.render(),
            "# HELP keyway_op_seconds Op.\n# TYPE keyway_op_seconds histogram\n\
             keyway_op_seconds_bucket{result=\"ok\",le=\"0.1\"} 2\n\
             keyway_op_seconds_bucket{result=\"ok\",le=\"1\"} 3\n\
             keyway_op_seconds_bucket{result=\"ok\",le=\"+Inf\"} 4\n\
             keyway_op_seconds_sum{result=\"ok\"} 7.65\n\
             keyway_op_seconds_count{result=\"ok\"} 4\n"
        );
        let plain = r.histogram("keyway_plain_seconds", "P.", &[], &[1.0]);
        plain.observe(&[], 2.0);
        assert!(r.render().contains(
            "keyway_plain_seconds_bucket{le=\"1\"} 0\nkeyway_plain_seconds_bucket{le=\"+Inf\"} 1\n\
             keyway_plain_seconds_sum 2\nkeyway_plain_seconds_count 1\n"
        ));
    }

    #[test]
    fn collectors_run_at_scrape_time() {
        let r = Registry::new();
        let c = r.counter("keyway_drops_total", "D.", &["reason"]);
        let n = Arc::new(AtomicU64::new(0));
        r.on_scrape({
            let n = n.clone();
            move || c.set_total(&["policy"], n.load(Ordering::Relaxed))
        });
        n.store(42, Ordering::Relaxed);
        assert!(r.render().contains("keyway_drops_total{reason=\"policy\"} 42\n"));
    }

    #[test]
    #[should_panic(expected = "registered twice")]
    fn names_are_unique() {
        let r = Registry::new();
        r.counter("keyway_x_total", "X.", &[]);
        r.gauge("keyway_x_total", "X.", &[]);
    }

    #[test]
    fn log_limiter_warns_once_per_key_and_interval() {
        let l = LogLimiter::new(std::time::Duration::from_millis(50));
        assert!(l.should_warn("peer-a/bad_csr"));
        assert!(!l.should_warn("peer-a/bad_csr"));
        assert!(l.should_warn("peer-b/bad_csr"));
        std::thread::sleep(std::time::Duration::from_millis(60));
        assert!(l.should_warn("peer-a/bad_csr"));
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
