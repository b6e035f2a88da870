//! The access log: one JSON object a line, written by its own thread.
//!
//! The request path hands a small record to a bounded channel and never waits: when the
//! writer falls behind (a slow disk, a stdout pipe nobody reads) records are dropped and
//! counted in `sidecar_access_log_dropped_total`, because a proxy that stalls on its log stalls
//! every request.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{Method, Uri, Version};
use prometheus_client::metrics::counter::Counter;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::config::{AccessLogConfig, AccessLogPath};

/// Records waiting for the writer. At 100k req/s this is 160 ms of traffic: room for a
/// scheduling hiccup, small enough (about 2 MiB) not to matter for memory.
const QUEUE: usize = 16 * 1024;

/// What the request path knows about one finished request.
pub struct AccessRecord {
    pub start: SystemTime,
    pub direction: &'static str,
    pub listener: Arc<str>,
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub status: u16,
    pub duration: Duration,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub peer: SocketAddr,
    pub peer_identity: Option<Arc<str>>,
    pub trace_id: Option<Box<str>>,
    pub error: Option<&'static str>,
}

#[derive(Serialize)]
struct Line<'a> {
    ts: String,
    direction: &'a str,
    listener: &'a str,
    method: &'a str,
    path: &'a str,
    protocol: &'a str,
    status: u16,
    duration_ms: f64,
    bytes_in: u64,
    bytes_out: u64,
    peer: String,
    peer_identity: Option<&'a str>,
    trace_id: Option<&'a str>,
    upstream: Option<&'a str>,
    error: Option<&'a str>,
}

/// The sending side, cloned into every listener. Disabled logs have no channel at all.
#[derive(Clone)]
pub struct AccessLog {
    tx: Option<mpsc::Sender<AccessRecord>>,
    dropped: Counter,
}

#[derive(Debug, thiserror::Error)]
#[error("access log {path}: {error}")]
pub struct AccessLogError {
    path: String,
    error: std::io::Error,
}

impl AccessLog {
    /// Opens the destination and starts the writer thread.
    pub fn start(config: &AccessLogConfig, dropped: Counter) -> Result<Self, AccessLogError> {
        if !config.enabled {
            return Ok(AccessLog { tx: None, dropped });
        }
        let out: Box<dyn Write + Send> = match &config.path {
            AccessLogPath::Stdout => Box::new(std::io::stdout()),
            AccessLogPath::File(p) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|error| AccessLogError { path: p.display().to_string(), error })?,
            ),
        };
        let (tx, rx) = mpsc::channel(QUEUE);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_loop(rx, out))
            .map_err(|error| AccessLogError { path: "thread".into(), error })?;
        Ok(AccessLog { tx: Some(tx), dropped })
    }

    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    pub fn log(&self, record: AccessRecord) {
        if let Some(tx) = &self.tx
            && tx.try_send(record).is_err()
        {
            self.dropped.inc();
        }
    }
}

fn write_loop(mut rx: mpsc::Receiver<AccessRecord>, out: Box<dyn Write + Send>) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
    while let Some(first) = rx.blocking_recv() {
        let mut next = Some(first);
        // Write everything already queued, then flush once: one syscall per burst.
        while let Some(rec) = next {
            let _ = write_record(&mut out, &rec);
            next = rx.try_recv().ok();
        }
        if out.flush().is_err() {
            // stdout closed: nothing more can be written; drain so senders never block.
            while rx.blocking_recv().is_some() {}
            return;
        }
    }
}

fn write_record(out: &mut impl Write, r: &AccessRecord) -> std::io::Result<()> {
    let path = r.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let line = Line {
        ts: humantime::format_rfc3339_millis(r.start).to_string(),
        direction: r.direction,
        listener: &r.listener,
        method: r.method.as_str(),
        path,
        protocol: version_str(r.version),
        status: r.status,
        duration_ms: (r.duration.as_micros() as f64) / 1000.0,
        bytes_in: r.bytes_in,
        bytes_out: r.bytes_out,
        peer: r.peer.to_string(),
        peer_identity: r.peer_identity.as_deref(),
        trace_id: r.trace_id.as_deref(),
        upstream: None,
        error: r.error,
    };
    serde_json::to_writer(&mut *out, &line)?;
    out.write_all(b"\n")
}

fn version_str(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/?",
    }
}

/// The trace id of a W3C `traceparent` header (`00-<32 hex>-<16 hex>-<2 hex>`), if well formed.
pub fn trace_id(traceparent: Option<&http::HeaderValue>) -> Option<Box<str>> {
    let v = traceparent?.to_str().ok()?;
    let mut parts = v.split('-');
    let _version = parts.next().filter(|p| p.len() == 2)?;
    let id = parts.next().filter(|p| p.len() == 32 && p.bytes().all(|b| b.is_ascii_hexdigit()))?;
    if id.bytes().all(|b| b == b'0') {
        return None;
    }
    Some(id.to_ascii_lowercase().into_boxed_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_is_one_json_line_with_the_public_fields() {
        let rec = AccessRecord {
            start: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            direction: "inbound",
            listener: "web".into(),
            method: Method::POST,
            uri: "/a?b=1".parse().unwrap(),
            version: Version::HTTP_11,
            status: 201,
            duration: Duration::from_micros(1500),
            bytes_in: 3,
            bytes_out: 4,
            peer: "127.0.0.1:5555".parse().unwrap(),
            peer_identity: None,
            trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736".into()),
            error: None,
        };
        let mut out = Vec::new();
        write_record(&mut out, &rec).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["ts"], "2023-11-14T22:13:20.000Z");
        assert_eq!(v["path"], "/a?b=1");
        assert_eq!(v["protocol"], "HTTP/1.1");
        assert_eq!(v["duration_ms"], 1.5);
        assert!(v["peer_identity"].is_null());
        assert!(out.ends_with(b"\n"));
    }

    #[test]
    fn traceparent_parsing() {
        let ok = http::HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        assert_eq!(trace_id(Some(&ok)).as_deref(), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        let zero = http::HeaderValue::from_static("00-00000000000000000000000000000000-00f067aa0ba902b7-01");
        assert_eq!(trace_id(Some(&zero)), None);
        assert_eq!(trace_id(Some(&http::HeaderValue::from_static("garbage"))), None);
    }
}
