//! The inbound direction's metric families (names are public: INTERFACE.md), registered on
//! the shared registry at start, and per-listener handles resolved once so the request path
//! never formats or hashes a label set.

use std::sync::{Arc, OnceLock};

use prometheus_client::encoding::{EncodeLabel, EncodeLabelSet, LabelSetEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::telemetry::histogram::{HistogramFamily, LatencyHistogram};

/// The label naming a listener: `listener` inbound, `upstream` outbound (the contract's
/// names: an outbound listener carries calls to the upstream of the same name).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Direction::Inbound => "listener",
            Direction::Outbound => "upstream",
        }
    }
}

/// A listener's label, plus one more (`status_code`, `reason`, `result`) where a family has it.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct Labels {
    direction: Direction,
    listener: String,
    extra: Option<(&'static str, String)>,
}

impl Labels {
    fn new(direction: Direction, listener: &str) -> Self {
        Labels { direction, listener: listener.to_owned(), extra: None }
    }

    fn with(mut self, key: &'static str, value: impl Into<String>) -> Self {
        self.extra = Some((key, value.into()));
        self
    }
}

impl EncodeLabelSet for Labels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        (self.direction.key(), self.listener.as_str()).encode(encoder.encode_label())?;
        if let Some((k, v)) = &self.extra {
            (*k, v.as_str()).encode(encoder.encode_label())?;
        }
        Ok(())
    }
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
    /// Outbound: a request for a host no upstream of the listener answers to (403).
    UnknownHost,
}

impl Reject {
    const ALL: [Reject; 8] = [
        Reject::MaxConnections,
        Reject::HeadersTooLarge,
        Reject::HeaderTimeout,
        Reject::Smuggling,
        Reject::Malformed,
        Reject::Http2Protocol,
        Reject::IdentityNotAllowed,
        Reject::UnknownHost,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reject::MaxConnections => "max_connections",
            Reject::HeadersTooLarge => "headers_too_large",
            Reject::HeaderTimeout => "header_timeout",
            Reject::Smuggling => "smuggling",
            Reject::Malformed => "malformed",
            Reject::Http2Protocol => "http2_protocol",
            Reject::IdentityNotAllowed => "identity_not_allowed",
            Reject::UnknownHost => "unknown_host",
        }
    }
}

/// How a TLS handshake ended: the `result` label of `sidecar_tls_handshakes_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handshake {
    Success,
    Timeout,
    /// The client closed or reset the connection mid-handshake.
    Aborted,
    /// The first bytes were not a TLS ClientHello.
    NotTls,
    /// No protocol version or cipher suite in common.
    Incompatible,
    NoClientCert,
    ClientCertExpired,
    ClientCertNotYetValid,
    UnknownCa,
    BadClientCert,
    Error,
}

impl Handshake {
    const ALL: [Handshake; 11] = [
        Handshake::Success,
        Handshake::Timeout,
        Handshake::Aborted,
        Handshake::NotTls,
        Handshake::Incompatible,
        Handshake::NoClientCert,
        Handshake::ClientCertExpired,
        Handshake::ClientCertNotYetValid,
        Handshake::UnknownCa,
        Handshake::BadClientCert,
        Handshake::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Handshake::Success => "success",
            Handshake::Timeout => "timeout",
            Handshake::Aborted => "aborted",
            Handshake::NotTls => "not_tls",
            Handshake::Incompatible => "incompatible",
            Handshake::NoClientCert => "no_client_cert",
            Handshake::ClientCertExpired => "client_cert_expired",
            Handshake::ClientCertNotYetValid => "client_cert_not_yet_valid",
            Handshake::UnknownCa => "unknown_ca",
            Handshake::BadClientCert => "bad_client_cert",
            Handshake::Error => "error",
        }
    }
}

/// One direction's families, cloned (they are shared handles) into every listener's metrics.
#[derive(Clone)]
pub struct InboundMetrics {
    direction: Direction,
    requests: Family<Labels, Counter>,
    duration: Arc<HistogramFamily>,
    open: Family<Labels, Gauge>,
    rejected: Family<Labels, Counter>,
    handshakes: Family<Labels, Counter>,
    cert_expiry: Family<Labels, Gauge>,
}

impl InboundMetrics {
    /// The latency family, which the exposition writes beside the registry.
    pub fn histograms(&self) -> Arc<HistogramFamily> {
        self.duration.clone()
    }

    /// The inbound families: `sidecar_inbound_*` and the TLS ones.
    pub fn register(registry: &mut Registry) -> Self {
        Self::register_direction(registry, Direction::Inbound)
    }

    /// `sidecar_{inbound,outbound}_*`; TLS termination families only inbound (outbound
    /// listeners take plain HTTP from the app).
    pub fn register_direction(registry: &mut Registry, direction: Direction) -> Self {
        let m = InboundMetrics {
            direction,
            requests: Family::default(),
            duration: HistogramFamily::new(
                format!("sidecar_{}_request_duration_seconds", direction.as_str()),
                "Time from request head to the end of the response body",
            ),
            open: Family::default(),
            rejected: Family::default(),
            handshakes: Family::default(),
            cert_expiry: Family::default(),
        };
        let d = direction.as_str();
        let name = |n: &str| format!("{d}_{n}");
        registry.register(
            name("requests"),
            format!("Requests answered on an {d} listener"),
            m.requests.clone(),
        );
        registry.register(name("connections_open"), format!("Open {d} connections"), m.open.clone());
        registry.register(
            name("rejected"),
            "Connections and requests refused, by reason",
            m.rejected.clone(),
        );
        if direction == Direction::Inbound {
            registry.register(
                "tls_handshakes",
                "TLS handshakes on inbound listeners, by result",
                m.handshakes.clone(),
            );
            registry.register(
                "tls_cert_expiry_timestamp_seconds",
                "When the listener's serving certificate expires (Unix time)",
                m.cert_expiry.clone(),
            );
        }
        m
    }

    /// The handles one listener needs, resolved now: every rejection reason's series exists
    /// (at 0) from the listener's start.
    pub fn listener(&self, name: &str) -> Arc<ListenerMetrics> {
        let labels = Labels::new(self.direction, name);
        let rejected = Reject::ALL
            .map(|r| self.rejected.get_or_create(&labels.clone().with("reason", r.as_str())).clone());
        Arc::new(ListenerMetrics {
            name: name.into(),
            duration: self.duration.get_or_create(vec![(self.direction.key(), name.to_owned())]),
            open: self.open.get_or_create(&labels).clone(),
            by_status: std::array::from_fn(|_| OnceLock::new()),
            rejected,
            handshakes: OnceLock::new(),
            cert_expiry: OnceLock::new(),
            families: self.clone(),
        })
    }
}

/// One listener's metric handles.
pub struct ListenerMetrics {
    pub name: Arc<str>,
    pub duration: LatencyHistogram,
    pub open: Gauge,
    /// Counters by status code 100..=599, created on first use.
    by_status: [OnceLock<Counter>; 500],
    rejected: [Counter; Reject::ALL.len()],
    /// Filled when the listener gets TLS (`tls_enabled`).
    handshakes: OnceLock<[Counter; Handshake::ALL.len()]>,
    cert_expiry: OnceLock<Gauge>,
    families: InboundMetrics,
}

impl ListenerMetrics {
    pub fn direction(&self) -> Direction {
        self.families.direction
    }

    /// A request answered with `status` after `elapsed`; `trace_id` when its span is sampled.
    pub fn request(&self, status: u16, elapsed: std::time::Duration, trace_id: Option<u128>) {
        self.duration.observe(elapsed, trace_id);
        let counter = match status.checked_sub(100).and_then(|i| self.by_status.get(i as usize)) {
            Some(slot) => slot.get_or_init(|| self.status_counter(status)),
            None => &self.status_counter(status),
        };
        counter.inc();
    }

    fn labels(&self) -> Labels {
        Labels::new(self.families.direction, &self.name)
    }

    fn status_counter(&self, status: u16) -> Counter {
        self.families.requests.get_or_create(&self.labels().with("status_code", status.to_string())).clone()
    }

    /// The listener terminates TLS: its handshake series (all at 0) and expiry gauge exist
    /// from now on. Returns the expiry gauge.
    pub fn tls_enabled(&self) -> Gauge {
        self.handshakes.get_or_init(|| {
            Handshake::ALL.map(|h| {
                self.families.handshakes.get_or_create(&self.labels().with("result", h.as_str())).clone()
            })
        });
        self.cert_expiry
            .get_or_init(|| self.families.cert_expiry.get_or_create(&self.labels()).clone())
            .clone()
    }

    /// The serving certificate's expiry gauge, on a TLS listener.
    pub fn cert_expiry(&self) -> Option<&Gauge> {
        self.cert_expiry.get()
    }

    /// Requests answered so far by status class: 1xx to 5xx.
    pub fn requests_by_class(&self) -> [u64; 5] {
        let mut out = [0; 5];
        for (i, slot) in self.by_status.iter().enumerate() {
            if let Some(c) = slot.get() {
                out[i / 100] += c.get();
            }
        }
        out
    }

    /// Connections and requests refused so far, every reason.
    pub fn rejected_total(&self) -> u64 {
        self.rejected.iter().map(|c| c.get()).sum()
    }

    /// A TLS handshake ended: `success`, or why not.
    pub fn handshake(&self, result: Handshake) {
        // Set by `tls_enabled` before the listener's first handshake.
        if let Some(counters) = self.handshakes.get()
            && let Some(i) = Handshake::ALL.iter().position(|h| *h == result)
        {
            counters[i].inc();
        }
    }

    pub fn reject(&self, reason: Reject) {
        if let Some(i) = Reject::ALL.iter().position(|r| *r == reason) {
            self.rejected[i].inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn encode(registry: &Registry) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, registry).unwrap();
        out
    }

    fn encode_with(registry: &Registry, m: &InboundMetrics) -> String {
        let mut out = encode(registry);
        m.histograms().encode(false, &mut out).unwrap();
        out
    }

    #[test]
    fn exposition_has_the_public_names() {
        let mut registry = Registry::with_prefix("sidecar");
        let m = InboundMetrics::register(&mut registry);
        let l = m.listener("web");
        l.request(200, Duration::from_millis(3), None);
        l.request(503, Duration::from_millis(30), None);
        l.reject(Reject::HeadersTooLarge);
        let out = encode_with(&registry, &m);
        for needle in [
            "sidecar_inbound_requests_total{listener=\"web\",status_code=\"200\"} 1",
            "sidecar_inbound_requests_total{listener=\"web\",status_code=\"503\"} 1",
            "sidecar_inbound_request_duration_seconds_count{listener=\"web\"} 2",
            "sidecar_inbound_request_duration_seconds_bucket{listener=\"web\",le=\"0.005\"} 1",
            "sidecar_inbound_rejected_total{listener=\"web\",reason=\"headers_too_large\"} 1",
            "sidecar_inbound_rejected_total{listener=\"web\",reason=\"max_connections\"} 0",
        ] {
            assert!(out.contains(needle), "missing {needle} in\n{out}");
        }
        assert!(!out.contains("sidecar_tls_handshakes_total{"), "a plain listener has no handshake series");
    }

    #[test]
    fn outbound_series_are_labelled_by_upstream() {
        let mut registry = Registry::with_prefix("sidecar");
        InboundMetrics::register(&mut registry);
        let m = InboundMetrics::register_direction(&mut registry, Direction::Outbound);
        let l = m.listener("orders");
        l.request(200, Duration::from_millis(3), None);
        let out = encode_with(&registry, &m);
        assert!(
            out.contains("sidecar_outbound_requests_total{upstream=\"orders\",status_code=\"200\"} 1"),
            "{out}"
        );
        assert!(
            out.contains("sidecar_outbound_request_duration_seconds_count{upstream=\"orders\"} 1"),
            "{out}"
        );
    }

    #[test]
    fn handshake_series_exist_at_zero_once_tls_is_on() {
        let mut registry = Registry::with_prefix("sidecar");
        let l = InboundMetrics::register(&mut registry).listener("secure");
        l.tls_enabled();
        l.handshake(Handshake::UnknownCa);
        let out = encode(&registry);
        assert!(
            out.contains("sidecar_tls_handshakes_total{listener=\"secure\",result=\"success\"} 0"),
            "{out}"
        );
        assert!(
            out.contains("sidecar_tls_handshakes_total{listener=\"secure\",result=\"unknown_ca\"} 1"),
            "{out}"
        );
    }
}
