//! Metric families (names are public: see INTERFACE.md) and per-listener handles that the
//! request path uses without hashing label sets or taking locks.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    pub listener: String,
    pub status_code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectLabels {
    pub listener: String,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    pub listener: String,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

/// Why a connection or request was refused: the `reason` label of
/// `sidecar_inbound_rejected_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reject {
    /// More open connections than `limits.max_connections`.
    MaxConnections,
    /// Request head over `limits.max_header_bytes` or too many headers (431).
    HeadersTooLarge,
    /// Request head not sent within `limits.header_read_timeout` (slowloris).
    HeaderTimeout,
    /// Framing a proxy and an app could read differently: CL with TE, differing CLs,
    /// a bare LF, obs-fold, a bad chunk (400, connection closed).
    Smuggling,
    /// Anything else hyper refuses to parse (400).
    Malformed,
    /// HTTP/2 abuse: rapid reset, CONTINUATION flood, protocol errors (GOAWAY).
    Http2Protocol,
    /// A verified client whose identity is not in `tls.allowed_identities` (403, or the
    /// TCP connection closed).
    IdentityNotAllowed,
}

impl Reject {
    pub fn as_str(self) -> &'static str {
        match self {
            Reject::MaxConnections => "max_connections",
            Reject::HeadersTooLarge => "headers_too_large",
            Reject::HeaderTimeout => "header_timeout",
            Reject::Smuggling => "smuggling",
            Reject::Malformed => "malformed",
            Reject::Http2Protocol => "http2_protocol",
            Reject::IdentityNotAllowed => "identity_not_allowed",
        }
    }
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

/// The shared registry and the families the listeners and the app loop use, registered once
/// at start. Modules with metrics of their own (the access log) register them on `registry`.
pub struct Metrics {
    pub registry: Registry,
    inbound_requests: Family<StatusLabels, Counter>,
    inbound_duration: Family<ListenerLabels, LatencyHistogram>,
    inbound_open: Family<ListenerLabels, Gauge>,
    inbound_rejected: Family<RejectLabels, Counter>,
    tls_handshakes: Family<HandshakeLabels, Counter>,
    tls_expiry: Family<ListenerLabels, Gauge>,
    pub app_ready: Gauge,
    config_reloads: Family<ResultLabels, Counter>,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("sidecar");
        let inbound_requests = Family::<StatusLabels, Counter>::default();
        registry.register(
            "inbound_requests",
            "Requests answered on an inbound listener",
            inbound_requests.clone(),
        );
        let inbound_duration = Family::<ListenerLabels, LatencyHistogram>::default();
        registry.register(
            "inbound_request_duration_seconds",
            "Time from request head to the end of the response body",
            inbound_duration.clone(),
        );
        let inbound_open = Family::<ListenerLabels, Gauge>::default();
        registry.register("inbound_connections_open", "Open inbound connections", inbound_open.clone());
        let inbound_rejected = Family::<RejectLabels, Counter>::default();
        registry.register(
            "inbound_rejected",
            "Connections and requests refused, by reason",
            inbound_rejected.clone(),
        );
        let tls_handshakes = Family::<HandshakeLabels, Counter>::default();
        registry.register(
            "tls_handshakes",
            "TLS handshakes on inbound listeners, by result",
            tls_handshakes.clone(),
        );
        let tls_expiry = Family::<ListenerLabels, Gauge>::default();
        registry.register(
            "tls_cert_expiry_timestamp_seconds",
            "When the listener's serving certificate expires (Unix time)",
            tls_expiry.clone(),
        );
        let app_ready = Gauge::default();
        registry.register("app_ready", "1 when the app passes its health check", app_ready.clone());
        let config_reloads = Family::<ResultLabels, Counter>::default();
        registry.register("config_reloads", "Config reloads, by result", config_reloads.clone());
        Metrics {
            registry,
            inbound_requests,
            inbound_duration,
            inbound_open,
            inbound_rejected,
            tls_handshakes,
            tls_expiry,
            app_ready,
            config_reloads,
        }
    }

    /// The handles one listener needs, resolved once so requests never hash label sets.
    pub fn listener(self: &Arc<Self>, name: &str) -> Arc<ListenerMetrics> {
        let labels = ListenerLabels { listener: name.to_owned() };
        Arc::new(ListenerMetrics {
            name: name.into(),
            duration: self.inbound_duration.get_or_create(&labels).clone(),
            open: self.inbound_open.get_or_create(&labels).clone(),
            by_status: std::array::from_fn(|_| OnceLock::new()),
            metrics: self.clone(),
        })
    }

    pub fn config_reload(&self, ok: bool) {
        let result = if ok { "success" } else { "error" };
        self.config_reloads.get_or_create(&ResultLabels { result }).inc();
    }

    pub fn encode(&self, out: &mut String) -> std::fmt::Result {
        prometheus_client::encoding::text::encode(out, &self.registry)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// One listener's metric handles.
pub struct ListenerMetrics {
    pub name: Arc<str>,
    pub duration: LatencyHistogram,
    pub open: Gauge,
    /// Counters by status code 100..=599, created on first use.
    by_status: [OnceLock<Counter>; 500],
    metrics: Arc<Metrics>,
}

impl ListenerMetrics {
    pub fn request(&self, status: u16, elapsed: std::time::Duration) {
        self.duration.observe(elapsed);
        let counter = match status.checked_sub(100).and_then(|i| self.by_status.get(i as usize)) {
            Some(slot) => slot.get_or_init(|| self.status_counter(status)),
            None => &self.status_counter(status),
        };
        counter.inc();
    }

    fn status_counter(&self, status: u16) -> Counter {
        let labels = StatusLabels { listener: self.name.to_string(), status_code: status.to_string() };
        self.metrics.inbound_requests.get_or_create(&labels).clone()
    }

    /// The certificate expiry gauge; created on first use, so only TLS listeners have one.
    pub fn cert_expiry(&self) -> Gauge {
        let labels = ListenerLabels { listener: self.name.to_string() };
        self.metrics.tls_expiry.get_or_create(&labels).clone()
    }

    /// A TLS handshake ended: `success`, or why not.
    pub fn handshake(&self, result: &'static str) {
        let labels = HandshakeLabels { listener: self.name.to_string(), result };
        self.metrics.tls_handshakes.get_or_create(&labels).inc();
    }

    pub fn reject(&self, reason: Reject) {
        let labels = RejectLabels { listener: self.name.to_string(), reason: reason.as_str() };
        self.metrics.inbound_rejected.get_or_create(&labels).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn exposition_has_the_public_names() {
        let m = Arc::new(Metrics::new());
        let l = m.listener("web");
        l.request(200, Duration::from_millis(3));
        l.request(503, Duration::from_millis(30));
        l.reject(Reject::HeadersTooLarge);
        m.config_reload(false);
        let mut out = String::new();
        m.encode(&mut out).unwrap();
        for needle in [
            "sidecar_inbound_requests_total{listener=\"web\",status_code=\"200\"} 1",
            "sidecar_inbound_requests_total{listener=\"web\",status_code=\"503\"} 1",
            "sidecar_inbound_request_duration_seconds_count{listener=\"web\"} 2",
            "sidecar_inbound_request_duration_seconds_bucket{le=\"0.005\",listener=\"web\"} 1",
            "sidecar_inbound_rejected_total{listener=\"web\",reason=\"headers_too_large\"} 1",
            "sidecar_config_reloads_total{result=\"error\"} 1",
            "sidecar_app_ready 0",
        ] {
            assert!(out.contains(needle), "missing {needle} in\n{out}");
        }
    }
}
