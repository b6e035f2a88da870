//! A request's end: the status counter and latency histogram, a failure's reason on the
//! admin page, the access-log record, the span, and the app connection kept for the client
//! connection's next request. What it needs is read when the request arrives
//! (`RequestEnd::new`), before the request is rewritten for the app.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime};

use http::{HeaderValue, Method, Request, Version, header};
use hyper::body::Incoming;

use super::Conn;
use crate::admin::ErrorEntry;
use crate::inbound::ListenerMetrics;
use crate::inbound::metrics::Direction;
use crate::proxy::body::{BodyStats, OnEnd};
use crate::proxy::pool::H1Conn;
use crate::telemetry::access_log::{AccessRecord, owned_path};
use crate::telemetry::context::{Incoming as TraceIncoming, SpanContext, caller_trace_id};
use crate::telemetry::spans::SpanRecord;

/// The end of one request: metrics, the access-log record, the span, the app connection
/// returned. Runs when the response body ends or is dropped, so durations include the body.
pub(super) struct RequestEnd {
    conn: Arc<Conn>,
    /// The listener's, or on a listener shared by upstreams, the chosen upstream's.
    pub(super) metrics: Arc<ListenerMetrics>,
    pub(super) start: Instant,
    wall: SystemTime,
    method: Method,
    /// The path and query, for the access log, the span and the admin page's errors.
    path: Option<Cow<'static, str>>,
    pub(super) version: Version,
    pub(super) status: u16,
    /// With tracing off and the access log on: the caller's trace, as its `traceparent`
    /// says (with tracing on, the span's trace is logged).
    caller_trace: Option<u128>,
    pub(super) error: Option<&'static str>,
    pub(super) req_stats: Option<Arc<BodyStats>>,
    /// With tracing on. Boxed: with it off, a request's end moves 8 bytes instead of ~150
    /// (measured: 290 instructions a request).
    pub(super) trace: Option<Box<Trace>>,
}

/// The sidecar's span for a request, what the caller sent, and for a sampled span the
/// `Host` and `User-Agent` read before the request is rewritten.
pub(super) struct Trace {
    pub(super) span: SpanContext,
    pub(super) incoming: TraceIncoming,
    host: Option<Box<str>>,
    user_agent: Option<Box<str>>,
}

impl RequestEnd {
    pub(super) fn new(req: &Request<Incoming>, conn: &Arc<Conn>) -> Self {
        let l = &conn.listener;
        let h = req.headers();
        let trace = l.tracer.start_span(h).map(|(span, incoming)| {
            let (host, user_agent) = if span.sampled {
                // Copied: see `AccessRecord::path`.
                let text = |v: &HeaderValue| v.to_str().ok().map(Box::from);
                let host = h.get(header::HOST).and_then(text);
                let host = host.or_else(|| req.uri().authority().map(|a| a.as_str().into()));
                (host, h.get(header::USER_AGENT).and_then(text))
            } else {
                (None, None)
            };
            Box::new(Trace { span, incoming, host, user_agent })
        });
        let sampled = trace.as_ref().is_some_and(|t| t.span.sampled);
        let logging = l.access_log.enabled();
        let caller_trace = if logging && trace.is_none() { caller_trace_id(h) } else { None };
        let recording = logging || sampled;
        RequestEnd {
            conn: conn.clone(),
            metrics: l.metrics.clone(),
            start: Instant::now(),
            wall: if recording { SystemTime::now() } else { SystemTime::UNIX_EPOCH },
            method: req.method().clone(),
            path: recording.then(|| owned_path(req.uri())),
            version: req.version(),
            status: 0,
            caller_trace,
            error: None,
            req_stats: None,
            trace,
        }
    }
}

impl OnEnd for RequestEnd {
    fn on_end(self, bytes_out: u64, complete: bool, reusable: Option<H1Conn>) {
        let conn = &self.conn;
        let elapsed = self.start.elapsed();
        let trace_id = self.trace.as_ref().map(|t| t.span.trace_id).or(self.caller_trace);
        let sampled = self.trace.filter(|t| t.span.sampled);
        self.metrics.request(self.status, elapsed, sampled.as_ref().map(|t| t.span.trace_id));
        // Given only when both bodies went through whole and the app keeps it open;
        // otherwise it was dropped, which closed it.
        if let Some(app_conn) = reusable {
            conn.sticky.keep(app_conn);
        }
        let l = &conn.listener;
        let direction = self.metrics.direction();
        let error = self.error.or((!complete).then_some("response_incomplete"));
        if let Some(error) = error {
            l.board.error(ErrorEntry {
                ts: SystemTime::now(),
                direction: direction.as_str(),
                listener: self.metrics.name.clone(),
                method: self.method.to_string(),
                // The path only: a query may carry what the page should not show.
                path: self
                    .path
                    .as_deref()
                    .unwrap_or_default()
                    .split('?')
                    .next()
                    .unwrap_or_default()
                    .to_owned(),
                status: self.status,
                error,
            });
        }
        if !l.access_log.enabled() && sampled.is_none() {
            return;
        }
        let record = AccessRecord {
            start: self.wall,
            direction: direction.as_str(),
            upstream: (direction == Direction::Outbound).then(|| self.metrics.name.clone()),
            listener: l.metrics.name.clone(),
            method: self.method,
            path: self.path.unwrap_or(Cow::Borrowed("/")),
            version: self.version,
            status: self.status,
            duration: elapsed,
            bytes_in: self.req_stats.map_or(0, |s| s.bytes.load(Ordering::Relaxed)),
            bytes_out,
            peer: conn.peer,
            peer_identity: conn.identity.as_ref().map(|i| i.id.clone()),
            trace_id,
            error,
        };
        if let Some(t) = sampled {
            let Trace { span: ctx, host, user_agent, .. } = *t;
            let tls = l.tls.is_some();
            let span = |request| SpanRecord { ctx, request, host, user_agent, tls };
            if !l.access_log.enabled() {
                return l.tracer.record(span(record));
            }
            l.tracer.record(span(record.clone()));
        }
        l.access_log.log(record);
    }
}
