//! The shared registry, its exposition in both text formats, and the lock-free latency
//! histogram. Each module registers its own families on the registry at start
//! (`InboundMetrics::register`, the access log, span export, health, the reloader), so
//! nothing here grows with every feature.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

use super::process::ProcessCollector;

/// The registry every family is registered on, with the public `sidecar_` prefix.
pub fn registry() -> Registry {
    Registry::with_prefix("sidecar")
}

/// The text formats a scrape may ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `text/plain; version=0.0.4`: what Prometheus asks for by default and promtool checks.
    Prometheus,
    /// `application/openmetrics-text; version=1.0.0`.
    OpenMetrics,
}

/// Everything a scrape shows: the `process_*` families, then the registry's.
pub struct Exposition {
    registry: Arc<Registry>,
    process: Registry,
}

impl Exposition {
    pub fn new(registry: Arc<Registry>, started: std::time::SystemTime) -> Self {
        let mut process = Registry::default();
        process.register_collector(Box::new(ProcessCollector::new(started)));
        Exposition { registry, process }
    }

    pub fn encode(&self, format: Format, out: &mut String) -> std::fmt::Result {
        // prometheus-client writes OpenMetrics: one `# EOF`, after the last family.
        let mut om = String::with_capacity(16 * 1024);
        prometheus_client::encoding::text::encode_registry(&mut om, &self.process)?;
        prometheus_client::encoding::text::encode(&mut om, &self.registry)?;
        match format {
            Format::OpenMetrics => out.push_str(&om),
            Format::Prometheus => to_prometheus(&om, out),
        }
        Ok(())
    }
}

/// OpenMetrics text as the Prometheus 0.0.4 format. The two differ, for what we write, in
/// the family names of counters (OpenMetrics names the family `x` and its sample
/// `x_total`; 0.0.4 has no such split, so `# TYPE x counter` would leave `x_total` untyped),
/// in `# UNIT` and `# EOF` (not in 0.0.4), and in exemplars (OpenMetrics only).
fn to_prometheus(om: &str, out: &mut String) {
    out.reserve(om.len());
    // A family's `# HELP` comes before its `# TYPE`: held until the type says its name.
    let mut help: Option<(&str, &str)> = None;
    for line in om.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = Some(rest.split_once(' ').unwrap_or((rest, "")));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let (suffix, kind) = match kind {
                "counter" => ("_total", "counter"),
                "info" => ("_info", "gauge"),
                "gaugehistogram" => ("", "histogram"),
                "unknown" | "stateset" => ("", "untyped"),
                k => ("", k),
            };
            if let Some((_, text)) = help.take() {
                push_line(out, &["# HELP ", name, suffix, " ", text]);
            }
            push_line(out, &["# TYPE ", name, suffix, " ", kind]);
            continue;
        }
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        // Exemplars follow a sample as ` # {...} value [timestamp]`.
        let sample = line.find(" # {").map_or(line, |i| &line[..i]);
        push_line(out, &[sample]);
    }
}

fn push_line(out: &mut String, parts: &[&str]) {
    for p in parts {
        out.push_str(p);
    }
    out.push('\n');
}

/// Latency buckets in seconds, 0.5 ms to 10 s: a sidecar's own hop is under the first, the
/// apps behind it take 1 ms to seconds.
pub const LATENCY_BUCKETS: [f64; 14] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// A histogram of fixed buckets made of atomics. prometheus-client's own takes a mutex on
/// every observation, which the request path must not.
#[derive(Debug, Clone, Default)]
pub struct LatencyHistogram {
    inner: Arc<HistInner>,
}

#[derive(Debug, Default)]
struct HistInner {
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
    count: AtomicU64,
}

/// A histogram's state at one moment: per-bucket (not cumulative) counts, the last one
/// above every bound, and the sum in seconds.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct HistogramSnapshot {
    pub counts: Vec<u64>,
    pub sum: f64,
}

impl LatencyHistogram {
    pub fn observe(&self, d: std::time::Duration) {
        let secs = d.as_secs_f64();
        let i = LATENCY_BUCKETS.iter().position(|b| secs <= *b).unwrap_or(LATENCY_BUCKETS.len());
        self.inner.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.inner.sum_nanos.fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
        self.inner.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            counts: self.inner.buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect(),
            sum: self.inner.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }
}

impl TypedMetric for LatencyHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for LatencyHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        // Per-bucket counts: the encoder makes them cumulative.
        let mut buckets = [(0.0, 0u64); LATENCY_BUCKETS.len() + 1];
        for (i, slot) in buckets.iter_mut().enumerate() {
            let upper = LATENCY_BUCKETS.get(i).copied().unwrap_or(f64::INFINITY);
            *slot = (upper, self.inner.buckets[i].load(Ordering::Relaxed));
        }
        // The count is the sum of the buckets read, so the exposition is self-consistent
        // even while requests are being observed.
        let count = buckets.iter().map(|b| b.1).sum();
        let sum = self.inner.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;

    fn exposition(r: Registry, format: Format) -> String {
        let mut out = String::new();
        Exposition::new(Arc::new(r), std::time::SystemTime::now()).encode(format, &mut out).unwrap();
        out
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_count_matches() {
        let mut r = registry();
        let h = LatencyHistogram::default();
        r.register("x_duration_seconds", "test", h.clone());
        h.observe(std::time::Duration::from_micros(300));
        h.observe(std::time::Duration::from_millis(3));
        h.observe(std::time::Duration::from_secs(60));
        let out = exposition(r, Format::OpenMetrics);
        for needle in [
            "sidecar_x_duration_seconds_bucket{le=\"0.0005\"} 1",
            "sidecar_x_duration_seconds_bucket{le=\"0.005\"} 2",
            "sidecar_x_duration_seconds_bucket{le=\"+Inf\"} 3",
            "sidecar_x_duration_seconds_count 3",
        ] {
            assert!(out.contains(needle), "missing {needle} in\n{out}");
        }
        assert_eq!(h.snapshot().counts.iter().sum::<u64>(), 3);
    }

    #[test]
    fn prometheus_format_names_counter_families_with_total() {
        let mut r = registry();
        let c = Counter::<u64>::default();
        r.register("things", "Things seen", c.clone());
        c.inc();
        let om = exposition(r, Format::OpenMetrics);
        assert!(om.contains("# TYPE sidecar_things counter\n"), "{om}");
        assert!(om.ends_with("# EOF\n"));
        let mut r = registry();
        r.register("things", "Things seen", c);
        let text = exposition(r, Format::Prometheus);
        assert!(text.contains("# HELP sidecar_things_total Things seen.\n"), "{text}");
        assert!(text.contains("# TYPE sidecar_things_total counter\nsidecar_things_total 1\n"), "{text}");
        assert!(text.contains("# TYPE process_cpu_seconds_total counter\n"), "{text}");
        assert!(text.contains("process_resident_memory_bytes "), "{text}");
        assert!(!text.contains("# EOF"));
    }
}
