//! The sidecar's spans: one per request (server inbound, client outbound), exported over
//! OTLP/HTTP protobuf from a thread of their own.
//!
//! The request path decides sampling and hands a finished request's facts to a bounded queue
//! (`Tracer::record`); it never builds OpenTelemetry values, never waits, and when the queue
//! is full the span is dropped and counted. The exporter thread writes records as OTLP spans
//! with the HTTP semantic conventions (`telemetry::otlp`, protobuf), in batches of
//! `batch_size` or every `batch_timeout`, and POSTs each batch with opentelemetry-http's
//! hyper client within `export_timeout`, retrying a refused connection, 429 and 502–504
//! (after `Retry-After` when given) while time is left. Not the SDK's `SpanData` and
//! opentelemetry-otlp's exporter: that path cost 25k instructions a span, as much as proxying
//! the request (ARCHITECTURE.md). While a collector is down, slow or hung, the thread waits on it, the
//! queue fills, and spans are dropped: `sidecar_tracing_spans_dropped_total{reason}`, with
//! `queue_full` (the request path found no room) or `export_failed` (the collector refused
//! or never answered). Owns its metric families.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::time::{Duration, Instant, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Version};
use opentelemetry_http::HttpClient;
use opentelemetry_http::hyper::HyperClient;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use prost::Message;

use super::access_log::AccessRecord;
use super::context::{Incoming, Sampler, SpanContext};
use super::otlp::{self, Attr, SpanFields};
use super::pace::{Pace, TICK};
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
    /// Copied, like the record's path, so nothing holds the connection's read buffer.
    pub host: Option<Box<str>>,
    pub user_agent: Option<Box<str>>,
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
    tx: SyncSender<Queued>,
    queue_full: Counter,
    /// Set by `shutdown`: the exporter sends what is queued and stops.
    closing: Arc<AtomicBool>,
    /// The exporter says it has finished.
    done: std::sync::Mutex<Receiver<()>>,
}

#[derive(Debug, thiserror::Error)]
pub enum TracingError {
    #[error("telemetry.tracing.otlp_endpoint: `{0}` is not a URL")]
    Endpoint(String),
    #[error("telemetry.tracing.headers.{0}: not a valid header")]
    Header(String),
    #[error("telemetry.tracing: starting the exporter thread: {0}")]
    Thread(std::io::Error),
}

/// What the exporter thread's queue carries.
// A span is sent by value: boxing it to shrink the rare `Close` would allocate per request.
#[allow(clippy::large_enum_variant)]
enum Queued {
    Span(SpanRecord),
    /// Sent by `shutdown` after it sets `closing`, to wake a thread blocked on a quiet queue.
    Close,
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

        let endpoint: http::Uri =
            config.otlp_endpoint.parse().map_err(|_| TracingError::Endpoint(config.otlp_endpoint.clone()))?;
        let mut headers = HeaderMap::new();
        for (k, v) in &config.headers.0 {
            let bad = || TracingError::Header(k.clone());
            let mut value = HeaderValue::from_str(v).map_err(|_| bad())?;
            value.set_sensitive(true);
            headers.insert(http::HeaderName::from_bytes(k.as_bytes()).map_err(|_| bad())?, value);
        }
        let (tx, rx) = mpsc::sync_channel(config.queue_size);
        let (done_tx, done_rx) = mpsc::channel();
        let closing = Arc::new(AtomicBool::new(false));
        let batcher = Batcher {
            rx,
            endpoint,
            headers,
            resource: otlp::resource(&resource(config)),
            batch_size: config.batch_size,
            batch_timeout: config.batch_timeout,
            export_timeout: config.export_timeout,
            closing: closing.clone(),
            metrics: ExportMetrics { exported, failed },
            failing: false,
            client: None,
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
        match inner.tx.try_send(Queued::Span(span)) {
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
        // Full: the thread is busy, not blocked, and sees `closing` on its next turn.
        let _ = inner.tx.try_send(Queued::Close);
        if let Ok(done) = inner.done.lock()
            && done.recv_timeout(within).is_err()
        {
            tracing::warn!(?within, "span export did not finish before exit; queued spans are lost");
        }
    }
}

/// The resource every span carries: `service.name`, the pod's identity, configured
/// attributes, and `OTEL_RESOURCE_ATTRIBUTES` (`key=value,key=value`, as OpenTelemetry's
/// environment detector reads it; the config wins over it, the pod's variables over both).
fn resource(config: &TracingConfig) -> Vec<(String, String)> {
    let mut attrs: Vec<(String, String)> = Vec::new();
    let mut set = |k: &str, v: String| match attrs.iter_mut().find(|(key, _)| key == k) {
        Some(slot) => slot.1 = v,
        None => attrs.push((k.to_owned(), v)),
    };
    if let Ok(env) = std::env::var("OTEL_RESOURCE_ATTRIBUTES") {
        for (k, v) in env.split(',').filter_map(|kv| kv.split_once('=')) {
            set(k.trim(), percent_decode(v.trim()));
        }
    }
    for (k, v) in &config.resource {
        set(k, v.clone());
    }
    for (env, key) in POD_ENV {
        if let Ok(v) = std::env::var(env) {
            set(key, v);
        }
    }
    let name = config.service_name.clone().unwrap_or_else(|| "sidecar".into());
    set("service.name", name);
    set("service.version", env!("CARGO_PKG_VERSION").into());
    set("telemetry.sdk.name", "sidecar".into());
    set("telemetry.sdk.language", "rust".into());
    attrs
}

/// `%XX` escapes, which the OpenTelemetry spec allows in `OTEL_RESOURCE_ATTRIBUTES` values.
fn percent_decode(v: &str) -> String {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (b[i], b.get(i + 1).and_then(|c| hex(*c)), b.get(i + 2).and_then(|c| hex(*c))) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, ..) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The exporter thread: batches records and sends them, one export at a time.
struct Batcher {
    rx: Receiver<Queued>,
    endpoint: http::Uri,
    /// Sent with every export (tokens: marked sensitive).
    headers: HeaderMap,
    /// The encoded `Resource`, the same in every batch.
    resource: Vec<u8>,
    batch_size: usize,
    batch_timeout: Duration,
    export_timeout: Duration,
    closing: Arc<AtomicBool>,
    metrics: ExportMetrics,
    /// The last export failed: the next failure is only counted, a success is logged.
    failing: bool,
    /// Made on the first export, inside the runtime its connections need.
    client: Option<HyperClient>,
}

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
        let mut batch = otlp::Batch::default();
        let mut first = None::<Instant>;
        let mut pace = Pace::default();
        loop {
            let closing = self.closing.load(Ordering::Acquire);
            let next = match self.rx.try_recv() {
                // Quiet for a while with nothing to send: sleep until a span or the close
                // comes (see `telemetry::pace`).
                Err(TryRecvError::Empty) if !closing && first.is_none() && pace.is_idle() => {
                    self.rx.recv().map_err(|_| TryRecvError::Disconnected)
                }
                other => other,
            };
            match next {
                Ok(Queued::Span(r)) => {
                    pace.busy();
                    first.get_or_insert_with(Instant::now);
                    push(&mut batch, r);
                }
                // `closing` is set: the next turn sees it.
                Ok(Queued::Close) => {}
                // Spans are flowing: never blocked on the channel (see `telemetry::pace`).
                Err(TryRecvError::Empty) if !closing => {
                    let wait = first.map_or(TICK, |t| self.batch_timeout.saturating_sub(t.elapsed()));
                    if !wait.is_zero() {
                        std::thread::sleep(wait.min(TICK));
                    }
                }
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

    fn export(&mut self, runtime: &tokio::runtime::Runtime, batch: &mut otlp::Batch) {
        if batch.is_empty() {
            return;
        }
        let n = batch.len() as u64;
        let body = batch.finish(&self.resource, env!("CARGO_PKG_VERSION"));
        let client =
            self.client.get_or_insert_with(|| HyperClient::with_default_connector(self.export_timeout, None));
        let result =
            runtime.block_on(send(client, &self.endpoint, &self.headers, body.into(), self.export_timeout));
        match result {
            Ok(rejected) => {
                self.metrics.exported.inc_by(n.saturating_sub(rejected));
                self.metrics.failed.inc_by(rejected.min(n));
                if std::mem::take(&mut self.failing) {
                    tracing::info!("span export works again");
                }
            }
            Err(error) => {
                self.metrics.failed.inc_by(n);
                if !std::mem::replace(&mut self.failing, true) {
                    tracing::warn!(%error, spans = n, "span export failed; spans are dropped until the collector answers");
                }
            }
        }
    }
}

/// A record as an OTLP span in `batch`, with the HTTP semantic conventions.
fn push(batch: &mut otlp::Batch, r: SpanRecord) {
    let q = &r.request;
    let client = q.direction == "outbound";
    let (method, known) = method_name(&q.method);
    let mut attrs: Vec<(&str, Attr)> = Vec::with_capacity(18);
    attrs.push(("http.request.method", Attr::Str(method)));
    if !known {
        attrs.push(("http.request.method_original", Attr::Str(q.method.as_str())));
    }
    if q.status != 0 {
        attrs.push(("http.response.status_code", Attr::Int(q.status as i64)));
    }
    attrs.push(("network.protocol.version", Attr::Str(protocol_version(q.version))));
    let host = r.host.as_deref();
    let (address, port) = split_host(host);
    let upstream = q.upstream.as_deref().unwrap_or_default();
    let path = &*q.path;
    let (url_path, query) = path.split_once('?').map_or((path, None), |(p, q)| (p, Some(q)));
    let url_full;
    let client_address;
    if client {
        attrs.push(("server.address", Attr::Str(address.unwrap_or(upstream))));
        url_full = format!("http://{}{path}", host.unwrap_or(upstream));
        attrs.push(("url.full", Attr::Str(&url_full)));
        attrs.push(("sidecar.upstream", Attr::Str(upstream)));
    } else {
        if let Some(a) = address {
            attrs.push(("server.address", Attr::Str(a)));
        }
        attrs.push(("url.path", Attr::Str(url_path)));
        if let Some(query) = query {
            attrs.push(("url.query", Attr::Str(query)));
        }
        attrs.push(("url.scheme", Attr::Str(if r.tls { "https" } else { "http" })));
        let mut ip = Vec::with_capacity(15);
        let _ = crate::telemetry::access_log::format::ip(&mut ip, q.peer.ip());
        client_address = String::from_utf8(ip).unwrap_or_default();
        attrs.push(("client.address", Attr::Str(&client_address)));
        attrs.push(("client.port", Attr::Int(q.peer.port() as i64)));
    }
    if let Some(p) = port {
        attrs.push(("server.port", Attr::Int(p as i64)));
    }
    if let Some(ua) = r.user_agent.as_deref() {
        attrs.push(("user_agent.original", Attr::Str(ua)));
    }
    attrs.push(("http.request.body.size", Attr::Int(q.bytes_in as i64)));
    attrs.push(("http.response.body.size", Attr::Int(q.bytes_out as i64)));
    if let Some(id) = &q.peer_identity {
        attrs.push(("sidecar.peer.identity", Attr::Str(id)));
    }
    attrs.push(("sidecar.listener", Attr::Str(&q.listener)));
    // Server spans fail on 5xx only (a 4xx is the client's); client spans on 4xx too.
    let failed_status = q.status >= 500 || (client && q.status >= 400);
    let status_text;
    let error = match q.error {
        Some(e) => Some(e),
        None if failed_status => {
            status_text = q.status.to_string();
            Some(status_text.as_str())
        }
        None => None,
    };
    if let Some(e) = error {
        attrs.push(("error.type", Attr::Str(e)));
    }
    let start = q.start.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    batch.push(&SpanFields {
        trace_id: r.ctx.trace_id,
        span_id: r.ctx.span_id,
        parent: r.ctx.parent,
        // `{method}`: there is no route template to add, and a raw path would make names
        // unbounded (the conventions' rule).
        name: if known { method } else { "HTTP" },
        kind: if client { 3 } else { 2 },
        start_nanos: start,
        end_nanos: start + q.duration.as_nanos() as u64,
        attrs: &attrs,
        error,
    });
}

/// Statuses a collector uses for "try again" (OTLP/HTTP's retryable set).
fn retryable(status: http::StatusCode) -> bool {
    matches!(status.as_u16(), 429 | 502 | 503 | 504)
}

/// POSTs one export within `within`: a refused connection and retryable statuses are tried
/// again (after `Retry-After`, else 100 ms doubling) while time is left. Returns how many
/// spans the collector said it rejected (OTLP partial success).
async fn send(
    client: &HyperClient,
    endpoint: &http::Uri,
    headers: &HeaderMap,
    body: Bytes,
    within: Duration,
) -> Result<u64, String> {
    let deadline = Instant::now() + within;
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut req = http::Request::post(endpoint.clone()).body(body.clone()).map_err(|e| e.to_string())?;
        req.headers_mut().extend(headers.clone());
        req.headers_mut()
            .insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/x-protobuf"));
        let left = deadline.saturating_duration_since(Instant::now());
        let (error, wait) = match tokio::time::timeout(left, client.send_bytes(req)).await {
            Err(_) => return Err(format!("no answer within {within:?}")),
            Ok(Ok(resp)) if resp.status().is_success() => {
                let rejected = ExportTraceServiceResponse::decode(resp.body().clone())
                    .ok()
                    .and_then(|r| r.partial_success)
                    .map_or(0, |p| p.rejected_spans.max(0) as u64);
                return Ok(rejected);
            }
            Ok(Ok(resp)) if retryable(resp.status()) => {
                let after = resp
                    .headers()
                    .get(http::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                    .map(Duration::from_secs);
                (format!("collector answered {}", resp.status()), after.unwrap_or(backoff))
            }
            Ok(Ok(resp)) => return Err(format!("collector answered {}", resp.status())),
            Ok(Err(e)) => (e.to_string(), backoff),
        };
        if Instant::now() + wait >= deadline {
            return Err(error);
        }
        tokio::time::sleep(wait).await;
        backoff *= 2;
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
