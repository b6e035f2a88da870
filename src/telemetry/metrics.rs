//! The shared metrics registry and the lock-free latency histogram. Each module registers
//! its own families on the registry at start (`InboundMetrics::register`, the access log,
//! health, the reloader), so nothing here grows with every feature.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

/// The registry every family is registered on, with the public `sidecar_` prefix.
pub fn registry() -> Registry {
    Registry::with_prefix("sidecar")
}

/// The exposition text of `registry` (OpenMetrics text, which the 0.0.4 parser also reads).
pub fn encode(registry: &Registry, out: &mut String) -> std::fmt::Result {
    prometheus_client::encoding::text::encode(out, registry)
}

/// Latency buckets in seconds: a sidecar hop is sub-millisecond, apps are 1 ms – 10 s.
const LATENCY_BUCKETS: [f64; 16] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

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

impl LatencyHistogram {
    pub fn observe(&self, d: std::time::Duration) {
        let secs = d.as_secs_f64();
        let i = LATENCY_BUCKETS.iter().position(|b| secs <= *b).unwrap_or(LATENCY_BUCKETS.len());
        self.inner.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.inner.sum_nanos.fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
        self.inner.count.fetch_add(1, Ordering::Relaxed);
    }
}

impl TypedMetric for LatencyHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for LatencyHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
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

    #[test]
    fn histogram_buckets_are_cumulative_and_count_matches() {
        let mut r = registry();
        let h = LatencyHistogram::default();
        r.register("x_duration_seconds", "test", h.clone());
        h.observe(std::time::Duration::from_micros(300));
        h.observe(std::time::Duration::from_millis(3));
        h.observe(std::time::Duration::from_secs(60));
        let mut out = String::new();
        encode(&r, &mut out).unwrap();
        for needle in [
            "sidecar_x_duration_seconds_bucket{le=\"0.0005\"} 1",
            "sidecar_x_duration_seconds_bucket{le=\"0.005\"} 2",
            "sidecar_x_duration_seconds_bucket{le=\"+Inf\"} 3",
            "sidecar_x_duration_seconds_count 3",
        ] {
            assert!(out.contains(needle), "missing {needle} in\n{out}");
        }
    }
}
