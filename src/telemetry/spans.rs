//! The sidecar's spans: one per request (server inbound, client outbound), exported over
//! OTLP/HTTP by opentelemetry-otlp from a thread of their own.
//!
//! The request path decides sampling and hands a finished request's facts to a bounded queue
//! (`Tracer::record`); it never builds OpenTelemetry values, never waits, and when the queue
//! is full the span is dropped and counted. The exporter thread turns records into
//! `SpanData` with the HTTP semantic conventions, in batches of `batch_size` or every
//! `batch_timeout`, and sends each batch once, within `export_timeout` (the exporter's own
//! retries included). While a collector is down, slow or hung, the thread waits on it, the
//! queue fills, and spans are dropped: `sidecar_tracing_spans_dropped_total{reason}`, with
//! `queue_full` (the request path found no room) or `export_failed` (the collector refused
//! or never answered). Owns its metric families.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderValue, Method, Version};
use opentelemetry::trace::{SpanKind, Status, TraceFlags, TraceState};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter, SpanLinks};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use super::access_log::AccessRecord;
use super::context::{Incoming, Sampler, SpanContext};
use crate::config::TracingConfig;

/// The pod's identity from the downward API, as Kubernetes manifests usually name it, and
/// the resource attribute each becomes (OpenTelemetry's k8s conventions).
const POD_ENV: [(&str, &str); 4] = [
    ("POD_NAME", "k8s.pod.name"),
    ("POD_NAMESPACE", "k8s.namespace.name"),
    ("NODE_NAME", "k8s.node.name"),
    ("POD_UID", "k8s.pod.uid"),
];

/// A finished request the exporter makes a span of.
pub struct SpanRecord {
    pub ctx: SpanContext,
    pub request: AccessRecord,
    /// The `Host` or `:authority` the client asked for: `server.address` of a server span.
    pub host: Option<HeaderValue>,
    pub user_agent: Option<HeaderValue>,
    /// The client connection was TLS: `url.scheme` is `https`.
    pub tls: bool,
}

/// The labels of `sidecar_tracing_spans_dropped_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    /// `queue_full` or `export_failed`.
    reason: &'static str,
}

/// The request path's handle, cloned into every listener. Without `telemetry.tracing` it
/// holds nothing and every request costs one branch.
#[derive(Clone)]
pub struct Tracer {
    inner: Option<Arc<Inner>>,
    /// Exported, and dropped for either reason: for the admin page.
    counts: (Counter, Counter, Counter),
}

struct Inner {
    sampler: Sampler,
    tx: SyncSender<SpanRecord>,
    queue_full: Counter,
    /// Set by `shutdown`: the exporter sends what is queued and stops.
    closing: Arc<AtomicBool>,
    /// The exporter says it has finished.
    done: std::sync::Mutex<Receiver<()>>,
}

#[derive(Debug, thiserror::Error)]
pub enum TracingError {
    #[error("telemetry.tracing: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    #[error("telemetry.tracing: starting the exporter thread: {0}")]
    Thread(std::io::Error),
}

/// The exporter thread's counters.
struct ExportMetrics {
    exported: Counter,
    failed: Counter,
}

impl Tracer {
    /// Registers the tracing families (also when tracing is off: the names are public) and,
    /// with a config, builds the exporter and starts its thread.
    pub fn start(config: Option<&TracingConfig>, registry: &mut Registry) -> Result<Self, TracingError> {
        let dropped = Family::<DropLabels, Counter>::default();
        let exported = Counter::default();
        registry.register("tracing_spans_dropped", "Spans not exported, by reason", dropped.clone());
        registry.register("tracing_spans_exported", "Spans the collector accepted", exported.clone());
        let queue_full = dropped.get_or_create(&DropLabels { reason: "queue_full" }).clone();
        let failed = dropped.get_or_create(&DropLabels { reason: "export_failed" }).clone();
        let counts = (exported.clone(), queue_full.clone(), failed.clone());
        let Some(config) = config else { return Ok(Tracer { inner: None, counts }) };

        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(&config.otlp_endpoint)
            .with_timeout(config.export_timeout)
            .with_headers(config.headers.0.clone().into_iter().collect())
            .build()?;
        exporter.set_resource(&resource(config));
        let (tx, rx) = mpsc::sync_channel(config.queue_size);
        let (done_tx, done_rx) = mpsc::channel();
        let closing = Arc::new(AtomicBool::new(false));
        let batcher = Batcher {
            rx,
            exporter,
            batch_size: config.batch_size,
            batch_timeout: config.batch_timeout,
            export_timeout: config.export_timeout,
            closing: closing.clone(),
            metrics: ExportMetrics { exported, failed },
            scope: InstrumentationScope::builder("sidecar").with_version(env!("CARGO_PKG_VERSION")).build(),
            failing: false,
        };
        std::thread::Builder::new()
            .name("span-export".into())
            .spawn(move || {
                batcher.run();
                let _ = done_tx.send(());
            })
            .map_err(TracingError::Thread)?;
        tracing::info!(endpoint = %config.otlp_endpoint, sample_ratio = config.sample_ratio, "exporting spans over OTLP/HTTP");
        Ok(Tracer {
            inner: Some(Arc::new(Inner {
                sampler: Sampler::new(config.sample_ratio),
                tx,
                queue_full,
                closing,
                done: std::sync::Mutex::new(done_rx),
            })),
            counts,
        })
    }

    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Spans exported and spans dropped so far.
    pub fn counts(&self) -> (u64, u64) {
        let (exported, full, failed) = &self.counts;
        (exported.get(), full.get() + failed.get())
    }

    /// The sidecar's span for a request with these headers, or `None` with tracing off.
    pub fn start_span(&self, headers: &HeaderMap) -> Option<(SpanContext, Incoming)> {
        let inner = self.inner.as_ref()?;
        let incoming = super::context::read(headers);
        Some((SpanContext::start(incoming, &inner.sampler), incoming))
    }

    /// Queues a sampled span for export, or drops and counts it.
    pub fn record(&self, span: SpanRecord) {
        let Some(inner) = &self.inner else { return };
        match inner.tx.try_send(span) {
            Ok(()) => {}
            // Disconnected: the exporter has stopped (shutdown): nothing will send it.
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                inner.queue_full.inc();
            }
        }
    }

    /// Sends what is queued, waiting at most `within`: called once, at the end of the drain.
    pub fn shutdown(&self, within: Duration) {
        let Some(inner) = &self.inner else { return };
        inner.closing.store(true, Ordering::Release);
        if let Ok(done) = inner.done.lock()
            && done.recv_timeout(within).is_err()
        {
            tracing::warn!(?within, "span export did not finish before exit; queued spans are lost");
        }
    }
}

/// The resource every span carries: `service.name`, the pod's identity, configured
/// attributes, and what OpenTelemetry's environment detectors find (`OTEL_RESOURCE_ATTRIBUTES`).
fn resource(config: &TracingConfig) -> Resource {
    let mut attrs: Vec<KeyValue> = POD_ENV
        .iter()
        .filter_map(|(env, key)| std::env::var(env).ok().map(|v| KeyValue::new(*key, v)))
        .collect();
    attrs.extend(config.resource.iter().map(|(k, v)| KeyValue::new(k.clone(), v.clone())));
    attrs.push(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
    let name = config.service_name.clone().unwrap_or_else(|| "sidecar".into());
    Resource::builder().with_attributes(attrs).with_service_name(name).build()
}

/// The exporter thread: batches records and sends them, one export at a time.
struct Batcher {
    rx: Receiver<SpanRecord>,
    exporter: opentelemetry_otlp::SpanExporter,
    batch_size: usize,
    batch_timeout: Duration,
    export_timeout: Duration,
    closing: Arc<AtomicBool>,
    metrics: ExportMetrics,
    scope: InstrumentationScope,
    /// The last export failed: the next failure is only counted, a success is logged.
    failing: bool,
}

/// How often an idle exporter looks at the shutdown flag.
const TICK: Duration = Duration::from_millis(100);

impl Batcher {
    fn run(mut self) {
        // The exporter's hyper client needs a runtime; a current-thread one, entered only
        // while exporting, is all one batch at a time takes.
        let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "span export cannot start; spans will be dropped");
                return;
            }
        };
        let mut batch = Vec::with_capacity(self.batch_size);
        let mut first = None::<Instant>;
        loop {
            let closing = self.closing.load(Ordering::Acquire);
            let wait = match first {
                Some(t) => self.batch_timeout.saturating_sub(t.elapsed()).min(TICK),
                None => TICK,
            };
            match self.rx.recv_timeout(if closing { Duration::ZERO } else { wait }) {
                Ok(r) => {
                    first.get_or_insert_with(Instant::now);
                    batch.push(self.span(r));
                }
                Err(RecvTimeoutError::Timeout) if !closing => {}
                // Closing and nothing queued, or every sender gone: send the rest and stop.
                Err(_) => {
                    self.export(&runtime, &mut batch);
                    return;
                }
            }
            let due = first.is_some_and(|t| t.elapsed() >= self.batch_timeout);
            if batch.len() >= self.batch_size || (due && !batch.is_empty()) {
                self.export(&runtime, &mut batch);
                first = None;
            }
        }
    }

    fn export(&mut self, runtime: &tokio::runtime::Runtime, batch: &mut Vec<SpanData>) {
        if batch.is_empty() {
            return;
        }
        let n = batch.len() as u64;
        let spans = std::mem::replace(batch, Vec::with_capacity(self.batch_size));
        // The exporter's own timeout bounds each try; this bounds a client that ignores it.
        let result = runtime
            .block_on(async { tokio::time::timeout(self.export_timeout, self.exporter.export(spans)).await });
        match result {
            Ok(Ok(())) => {
                self.metrics.exported.inc_by(n);
                if std::mem::take(&mut self.failing) {
                    tracing::info!("span export works again");
                }
            }
            failed => {
                self.metrics.failed.inc_by(n);
                if !std::mem::replace(&mut self.failing, true) {
                    let error = match failed {
                        Ok(Err(e)) => e.to_string(),
                        _ => format!("no answer within {:?}", self.export_timeout),
                    };
                    tracing::warn!(%error, spans = n, "span export failed; spans are dropped until the collector answers");
                }
            }
        }
    }

    /// A record as OpenTelemetry's span, with the HTTP semantic conventions.
    fn span(&self, r: SpanRecord) -> SpanData {
        let q = &r.request;
        let client = q.direction == "outbound";
        let (method, known) = method_name(&q.method);
        let mut attrs = Vec::with_capacity(16);
        attrs.push(KeyValue::new("http.request.method", method));
        if !known {
            attrs.push(KeyValue::new("http.request.method_original", q.method.as_str().to_owned()));
        }
        if q.status != 0 {
            attrs.push(KeyValue::new("http.response.status_code", q.status as i64));
        }
        attrs.push(KeyValue::new("network.protocol.version", protocol_version(q.version)));
        let host = r.host.as_ref().and_then(|h| h.to_str().ok());
        let (address, port) = split_host(host);
        if client {
            let upstream = q.upstream.as_deref().unwrap_or_default();
            attrs.push(KeyValue::new("server.address", address.unwrap_or(upstream).to_owned()));
            let path = q.uri.path_and_query().map_or("/", |p| p.as_str());
            attrs.push(KeyValue::new("url.full", format!("http://{}{path}", host.unwrap_or(upstream))));
            attrs.push(KeyValue::new("sidecar.upstream", upstream.to_owned()));
        } else {
            if let Some(a) = address {
                attrs.push(KeyValue::new("server.address", a.to_owned()));
            }
            attrs.push(KeyValue::new("url.path", q.uri.path().to_owned()));
            if let Some(query) = q.uri.query() {
                attrs.push(KeyValue::new("url.query", query.to_owned()));
            }
            attrs.push(KeyValue::new("url.scheme", if r.tls { "https" } else { "http" }));
            attrs.push(KeyValue::new("client.address", q.peer.ip().to_string()));
            attrs.push(KeyValue::new("client.port", q.peer.port() as i64));
        }
        if let Some(p) = port {
            attrs.push(KeyValue::new("server.port", p as i64));
        }
        if let Some(ua) = r.user_agent.as_ref().and_then(|v| v.to_str().ok()) {
            attrs.push(KeyValue::new("user_agent.original", ua.to_owned()));
        }
        attrs.push(KeyValue::new("http.request.body.size", q.bytes_in as i64));
        attrs.push(KeyValue::new("http.response.body.size", q.bytes_out as i64));
        if let Some(id) = &q.peer_identity {
            attrs.push(KeyValue::new("sidecar.peer.identity", id.to_string()));
        }
        attrs.push(KeyValue::new("sidecar.listener", q.listener.to_string()));
        // Server spans fail on 5xx only (a 4xx is the client's); client spans on 4xx too.
        let failed_status = q.status >= 500 || (client && q.status >= 400);
        let error_type = match q.error {
            Some(e) => Some(Cow::Borrowed(e)),
            None if failed_status => Some(Cow::Owned(q.status.to_string())),
            None => None,
        };
        let status = match &error_type {
            Some(e) => {
                attrs.push(KeyValue::new("error.type", e.to_string()));
                Status::error(e.to_string())
            }
            None => Status::Unset,
        };
        let ctx = opentelemetry::trace::SpanContext::new(
            r.ctx.trace_id.into(),
            r.ctx.span_id.into(),
            TraceFlags::SAMPLED,
            false,
            TraceState::NONE,
        );
        SpanData {
            span_context: ctx,
            parent_span_id: r.ctx.parent.unwrap_or(0).into(),
            parent_span_is_remote: r.ctx.parent.is_some(),
            span_kind: if client { SpanKind::Client } else { SpanKind::Server },
            // `{method}`: there is no route template to add, and a raw path would make
            // names unbounded (the conventions' rule).
            name: Cow::Borrowed(if known { method } else { "HTTP" }),
            start_time: q.start,
            end_time: q.start + q.duration,
            attributes: attrs,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status,
            instrumentation_scope: self.scope.clone(),
        }
    }
}

/// The method as the conventions name it, and whether it is one they know (else `_OTHER`).
fn method_name(m: &Method) -> (&'static str, bool) {
    const KNOWN: [(Method, &str); 9] = [
        (Method::GET, "GET"),
        (Method::POST, "POST"),
        (Method::PUT, "PUT"),
        (Method::DELETE, "DELETE"),
        (Method::HEAD, "HEAD"),
        (Method::OPTIONS, "OPTIONS"),
        (Method::PATCH, "PATCH"),
        (Method::CONNECT, "CONNECT"),
        (Method::TRACE, "TRACE"),
    ];
    KNOWN.iter().find(|(k, _)| k == m).map_or(("_OTHER", false), |(_, n)| (*n, true))
}

fn protocol_version(v: Version) -> &'static str {
    match v {
        Version::HTTP_10 => "1.0",
        Version::HTTP_2 => "2",
        _ => "1.1",
    }
}

/// `host[:port]` (or `[v6]:port`) as its parts.
fn split_host(host: Option<&str>) -> (Option<&str>, Option<u16>) {
    let Some(h) = host else { return (None, None) };
    match h.rsplit_once(':') {
        Some((name, port)) if !name.ends_with(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            (Some(name.trim_start_matches('[').trim_end_matches(']')), port.parse().ok())
        }
        _ => (Some(h.trim_start_matches('[').trim_end_matches(']')), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_split_into_address_and_port() {
        assert_eq!(split_host(Some("orders:8080")), (Some("orders"), Some(8080)));
        assert_eq!(split_host(Some("orders")), (Some("orders"), None));
        assert_eq!(split_host(Some("[::1]:443")), (Some("::1"), Some(443)));
        assert_eq!(split_host(None), (None, None));
    }

    #[test]
    fn unknown_methods_are_other() {
        assert_eq!(method_name(&Method::GET), ("GET", true));
        assert_eq!(method_name(&Method::from_bytes(b"PURGE").unwrap()), ("_OTHER", false));
    }
}
