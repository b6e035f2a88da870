//! What the live admin page shows, as `GET /stats` JSON: per listener and upstream the
//! cumulative counts the page turns into rates and percentiles, readiness, the endpoints
//! and their state, certificate expiry, span export, and the last errors.
//!
//! `Board` is published to by the data plane (`Inbound` after each apply, the request path
//! on an error) and read by the admin thread once a poll: nothing here is on the success path
//! of a request, and an error takes the ring's lock only when nobody else holds it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::inbound::ListenerMetrics;
use crate::outbound::{EndpointState, Upstream};
use crate::readiness::Readiness;
use crate::telemetry::Tracer;
use crate::telemetry::histogram::{HistogramSnapshot, LATENCY_BUCKETS};

/// Errors the page lists, newest first.
const RECENT_ERRORS: usize = 20;
/// A client can put anything in a path: the page shows its start.
const MAX_PATH: usize = 200;

/// The listeners and upstreams now running, and the last errors.
#[derive(Default)]
pub struct Board {
    running: Mutex<Running>,
    errors: Mutex<VecDeque<ErrorEntry>>,
}

#[derive(Default)]
struct Running {
    listeners: Vec<Arc<ListenerMetrics>>,
    upstreams: Vec<Arc<Upstream>>,
}

/// One request the sidecar failed or cut short.
#[derive(Clone, Serialize)]
pub struct ErrorEntry {
    #[serde(serialize_with = "rfc3339")]
    pub ts: SystemTime,
    pub direction: &'static str,
    pub listener: Arc<str>,
    pub method: String,
    pub path: String,
    pub status: u16,
    pub error: &'static str,
}

fn rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*t))
}

impl Board {
    /// What a reload left running (replaces the previous set).
    pub fn publish(&self, listeners: Vec<Arc<ListenerMetrics>>, upstreams: Vec<Arc<Upstream>>) {
        *self.running.lock().unwrap_or_else(|p| p.into_inner()) = Running { listeners, upstreams };
    }

    /// Notes a failed request. Skipped when another thread is noting one: under an error
    /// storm the page needs a recent sample, not every one, and workers must not queue here.
    pub fn error(&self, mut entry: ErrorEntry) {
        if let Ok(mut ring) = self.errors.try_lock() {
            if entry.path.len() > MAX_PATH {
                let cut = (0..=MAX_PATH).rev().find(|&i| entry.path.is_char_boundary(i)).unwrap_or(0);
                entry.path.truncate(cut);
            }
            if ring.len() == RECENT_ERRORS {
                ring.pop_back();
            }
            ring.push_front(entry);
        }
    }
}

#[derive(Serialize)]
struct Stats<'a> {
    time: f64,
    started: f64,
    version: &'static str,
    ready: bool,
    not_ready: Vec<&'static str>,
    draining: bool,
    buckets: &'static [f64],
    listeners: Vec<ListenerStats>,
    upstreams: Vec<UpstreamStats>,
    recent_errors: Vec<ErrorEntry>,
    tracing: &'a TracingStats,
}

#[derive(Serialize)]
struct ListenerStats {
    direction: &'static str,
    name: Arc<str>,
    requests: u64,
    by_class: ByClass,
    open_connections: i64,
    rejected: u64,
    latency: HistogramSnapshot,
    cert_expiry: Option<i64>,
}

#[derive(Serialize)]
struct ByClass {
    #[serde(rename = "1xx")]
    c1: u64,
    #[serde(rename = "2xx")]
    c2: u64,
    #[serde(rename = "3xx")]
    c3: u64,
    #[serde(rename = "4xx")]
    c4: u64,
    #[serde(rename = "5xx")]
    c5: u64,
}

#[derive(Serialize)]
struct UpstreamStats {
    name: Arc<str>,
    retries: u64,
    unresolved: bool,
    endpoints: Vec<EndpointState>,
}

/// Span export's counters, for the page.
#[derive(Serialize)]
pub struct TracingStats {
    pub enabled: bool,
    pub exported: u64,
    pub dropped: u64,
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// The `/stats` document.
pub fn render(board: &Board, readiness: &Readiness, tracer: &Tracer, started: SystemTime) -> String {
    let (listeners, upstreams) = {
        let r = board.running.lock().unwrap_or_else(|p| p.into_inner());
        (r.listeners.clone(), r.upstreams.clone())
    };
    let not_ready = readiness.not_ready();
    let stats = Stats {
        time: unix(SystemTime::now()),
        started: unix(started),
        version: env!("CARGO_PKG_VERSION"),
        ready: not_ready.is_empty(),
        draining: not_ready.contains(&"draining"),
        not_ready,
        buckets: &LATENCY_BUCKETS,
        listeners: listeners.iter().map(|l| listener(l)).collect(),
        upstreams: upstreams
            .iter()
            .map(|u| UpstreamStats {
                name: u.name.clone(),
                retries: u.retries(),
                unresolved: u.unresolved(),
                endpoints: u.endpoint_states(),
            })
            .collect(),
        recent_errors: board.errors.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect(),
        tracing: &{
            let (exported, dropped) = tracer.counts();
            TracingStats { enabled: tracer.enabled(), exported, dropped }
        },
    };
    serde_json::to_string(&stats).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

fn listener(l: &ListenerMetrics) -> ListenerStats {
    let by_status = l.requests_by_class();
    ListenerStats {
        direction: l.direction().as_str(),
        name: l.name.clone(),
        requests: by_status.iter().sum(),
        by_class: ByClass {
            c1: by_status[0],
            c2: by_status[1],
            c3: by_status[2],
            c4: by_status[3],
            c5: by_status[4],
        },
        open_connections: l.open.get(),
        rejected: l.rejected_total(),
        latency: l.duration.snapshot(),
        cert_expiry: l.cert_expiry().map(|g| g.get()).filter(|&v| v > 0),
    }
}
