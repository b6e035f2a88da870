//! The families only outbound has (names are public: INTERFACE.md): retries and endpoint
//! states per upstream. Requests, latency and connections are the shared per-listener
//! families of `inbound::metrics`, labelled `upstream`.

use std::sync::atomic::{AtomicUsize, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::proxy::connect::PoolError;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    upstream: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    upstream: String,
    reason: &'static str,
}

#[derive(Clone)]
pub struct OutboundFamilies {
    retries: Family<UpstreamLabels, Counter>,
    endpoints: Family<StateLabels, Gauge>,
    connect_errors: Family<ReasonLabels, Counter>,
}

impl OutboundFamilies {
    pub fn register(registry: &mut Registry) -> Self {
        let f = OutboundFamilies {
            retries: Family::default(),
            endpoints: Family::default(),
            connect_errors: Family::default(),
        };
        registry.register(
            "outbound_connect_errors",
            "Connections to upstream endpoints that failed, by reason (connection_refused, \
             connect_timeout, connect_error, tls_error, identity_mismatch): nothing was sent on them",
            f.connect_errors.clone(),
        );
        registry.register("outbound_retries", "Retries sent, after a first try failed", f.retries.clone());
        registry.register(
            "outbound_endpoints",
            "Endpoints per upstream by state: healthy, ejected, draining (left the DNS answer with \
             requests in flight), unresolved (names whose last lookup failed: their last addresses are kept)",
            f.endpoints.clone(),
        );
        f
    }

    /// One upstream's handles; every state's series exists from the start.
    pub fn upstream(&self, name: &str) -> UpstreamMetrics {
        let state =
            |state| self.endpoints.get_or_create(&StateLabels { upstream: name.to_owned(), state }).clone();
        UpstreamMetrics {
            retries: self.retries.get_or_create(&UpstreamLabels { upstream: name.to_owned() }).clone(),
            healthy: state("healthy"),
            ejected: state("ejected"),
            draining: state("draining"),
            unresolved: state("unresolved"),
            unresolved_now: AtomicUsize::new(0),
            name: name.to_owned(),
            connect_errors: self.connect_errors.clone(),
        }
    }
}

pub struct UpstreamMetrics {
    pub retries: Counter,
    healthy: Gauge,
    ejected: Gauge,
    draining: Gauge,
    unresolved: Gauge,
    unresolved_now: AtomicUsize,
    name: String,
    connect_errors: Family<ReasonLabels, Counter>,
}

impl UpstreamMetrics {
    pub fn set_endpoints(&self, healthy: usize, ejected: usize, draining: usize, unresolved: usize) {
        self.healthy.set(healthy as i64);
        self.ejected.set(ejected as i64);
        self.draining.set(draining as i64);
        self.unresolved.set(unresolved as i64);
        self.unresolved_now.store(unresolved, Ordering::Relaxed);
    }

    /// Counts `e` when it is a connection that failed before anything was sent (other
    /// failures are the access log's); `reason` is its kind less the `app_` prefix.
    pub fn connect_error(&self, e: &PoolError) {
        if let PoolError::Connect { .. } | PoolError::ConnectTimeout { .. } | PoolError::Tls { .. } = e {
            let kind = e.kind();
            let reason = kind.strip_prefix("app_").unwrap_or(kind);
            self.connect_errors.get_or_create(&ReasonLabels { upstream: self.name.clone(), reason }).inc();
        }
    }

    /// Names whose last lookup failed, as last published.
    pub fn unresolved(&self) -> usize {
        self.unresolved_now.load(Ordering::Relaxed)
    }
}
