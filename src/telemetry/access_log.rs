//! The access log: one JSON object (or a human's text line) a line, written by its own thread.
//!
//! The request path hands a small record to a bounded channel and never waits, because a proxy
//! that stalls on its log stalls every request. Every record that does not reach the
//! destination is counted in `sidecar_access_log_dropped_total`, by reason: `queue_full` (the
//! writer fell behind: a slow disk, a stdout pipe nobody reads) or `write_error` (the
//! destination refused the bytes: a full disk, a closed pipe). The writer keeps trying later
//! records, so a destination that recovers is written again. Owns its metric family.

use std::io::{self, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use std::borrow::Cow;

use http::{Method, Uri, Version};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::{TryRecvError, TrySendError};

use super::pace::{Pace, TICK};

use crate::config::{AccessLogConfig, AccessLogPath, LogFormat};

pub(crate) mod format;

/// Records waiting for the writer. At 100k req/s this is 160 ms of traffic: room for a
/// scheduling hiccup, small enough (about 2 MiB) not to matter for memory.
const QUEUE: usize = 16 * 1024;

/// Formatted bytes per write: everything queued up to this goes in one syscall, the size the
/// `BufWriter` this replaced had. It is also the unit of retrying a broken destination: at
/// most one write attempt per batch, so a dead one costs one failed syscall per 64 KiB.
const BATCH: usize = 64 * 1024;

/// What the request path knows about one finished request.
#[derive(Clone)]
pub struct AccessRecord {
    pub start: SystemTime,
    pub direction: &'static str,
    pub listener: Arc<str>,
    pub method: Method,
    /// The request's path and query, copied: a `Uri` parsed by hyper shares the connection's
    /// read buffer, and a record holding it until its thread writes it makes hyper allocate
    /// a new 16 KiB buffer for the next request (2k instructions a request, measured).
    pub path: Cow<'static, str>,
    pub version: Version,
    pub status: u16,
    pub duration: Duration,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub peer: SocketAddr,
    pub peer_identity: Option<Arc<str>>,
    /// Written as 32 hex digits by the writer thread, not on the request path.
    pub trace_id: Option<u128>,
    pub error: Option<&'static str>,
    /// Outbound: the upstream the call went to.
    pub upstream: Option<Arc<str>>,
}

/// The labels of `sidecar_access_log_dropped_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DropLabels {
    /// `queue_full` or `write_error`.
    pub reason: &'static str,
}

/// The sending side, cloned into every listener. Disabled logs have no channel at all.
#[derive(Clone)]
pub struct AccessLog {
    tx: Option<mpsc::Sender<AccessRecord>>,
    /// Resolved once, so the request path never hashes a label set.
    queue_full: Counter,
    write_error: Counter,
}

/// The writer thread's state: records formatted into one batch, each batch written with one
/// attempt, and what did not reach the destination counted.
struct Writer<W> {
    out: W,
    format: LogFormat,
    stamps: format::Stamps,
    /// Where the lines go, for the operator: `stdout` or the file's path.
    dest: String,
    batch: Vec<u8>,
    /// Where each record of `batch` ends, so a short write is accounted record by record.
    ends: Vec<usize>,
    /// `sidecar_access_log_dropped_total{reason="write_error"}`.
    lost: Counter,
    /// Records lost since the destination last took a whole batch; `None` while it writes.
    /// The first error of a burst is logged, the rest are only counted.
    burst: Option<u64>,
    /// A short write left a line cut: the next batch starts with a newline, so the records
    /// after it are still one a line (the cut one is lost and counted).
    torn: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("access log {path}: {error}")]
pub struct AccessLogError {
    path: String,
    error: std::io::Error,
}

/// A request's path and query as a record keeps it: the common `/` without allocating.
pub fn owned_path(uri: &Uri) -> Cow<'static, str> {
    match uri.path_and_query().map(|p| p.as_str()) {
        None | Some("/") => Cow::Borrowed("/"),
        Some(p) => Cow::Owned(p.to_owned()),
    }
}

impl AccessLog {
    /// Registers `access_log_dropped` on `registry`, opens the destination and starts the
    /// writer thread. A disabled log registers its (idle) counters too: the names are public.
    pub fn start(config: &AccessLogConfig, registry: &mut Registry) -> Result<Self, AccessLogError> {
        let (queue_full, write_error) = register(registry);
        if !config.enabled {
            return Ok(AccessLog { tx: None, queue_full, write_error });
        }
        let (dest, out): (String, Box<dyn Write + Send>) = match &config.path {
            AccessLogPath::Stdout => ("stdout".into(), Box::new(std::io::stdout())),
            AccessLogPath::File(p) => {
                let dest = p.display().to_string();
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|error| AccessLogError { path: dest.clone(), error })?;
                (dest, Box::new(file))
            }
        };
        let writer = Writer::new(out, config.format, dest, write_error.clone());
        let (tx, rx) = mpsc::channel(QUEUE);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_loop(rx, writer))
            .map_err(|error| AccessLogError { path: "thread".into(), error })?;
        Ok(AccessLog { tx: Some(tx), queue_full, write_error })
    }

    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    pub fn log(&self, record: AccessRecord) {
        let Some(tx) = &self.tx else { return };
        match tx.try_send(record) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.queue_full.inc();
            }
            // The writer thread is gone (it panicked): nothing will ever write the record.
            Err(TrySendError::Closed(_)) => {
                self.write_error.inc();
            }
        }
    }
}

/// Registers `sidecar_access_log_dropped_total` and creates both series at 0, so they exist
/// (and a rate alert has data) before the first loss. Returns (`queue_full`, `write_error`).
fn register(registry: &mut Registry) -> (Counter, Counter) {
    let dropped = Family::<DropLabels, Counter>::default();
    registry.register(
        "access_log_dropped",
        "Access-log records lost, by reason: queue_full (the writer fell behind), \
         write_error (the destination refused the bytes)",
        dropped.clone(),
    );
    let queue_full = dropped.get_or_create(&DropLabels { reason: "queue_full" }).clone();
    let write_error = dropped.get_or_create(&DropLabels { reason: "write_error" }).clone();
    (queue_full, write_error)
}

fn write_loop<W: Write>(mut rx: mpsc::Receiver<AccessRecord>, mut writer: Writer<W>) {
    let mut pace = Pace::default();
    loop {
        let first = match rx.try_recv() {
            Ok(first) => first,
            // Quiet for a while: sleep until a record comes (see `telemetry::pace`).
            Err(TryRecvError::Empty) if pace.is_idle() => match rx.blocking_recv() {
                Some(first) => first,
                None => return,
            },
            // Never blocked on the channel while records flow: see `telemetry::pace`.
            Err(TryRecvError::Empty) => {
                std::thread::sleep(TICK);
                continue;
            }
            Err(TryRecvError::Disconnected) => return,
        };
        pace.busy();
        writer.push(&first);
        // Everything already queued, up to a batch, goes in one write.
        while writer.batch.len() < BATCH
            && let Ok(rec) = rx.try_recv()
        {
            writer.push(&rec);
        }
        writer.write_batch();
    }
}

impl<W: Write> Writer<W> {
    fn new(out: W, format: LogFormat, dest: String, lost: Counter) -> Self {
        Writer {
            out,
            format,
            stamps: format::Stamps::default(),
            dest,
            batch: Vec::with_capacity(BATCH + 4096),
            ends: Vec::new(),
            lost,
            burst: None,
            torn: false,
        }
    }

    fn push(&mut self, record: &AccessRecord) {
        if self.batch.is_empty() && self.torn {
            self.batch.push(b'\n');
        }
        let start = self.batch.len();
        let written = match self.format {
            LogFormat::Json => format::json(&mut self.batch, &mut self.stamps, record),
            LogFormat::Text => format::text(&mut self.batch, &mut self.stamps, record),
        };
        if written.is_err() {
            // Formatting into memory cannot fail for these plain fields; were it to, the
            // record is lost all the same, and counted.
            self.batch.truncate(start);
            self.lost.inc();
            return;
        }
        self.ends.push(self.batch.len());
    }

    /// Writes the batch with one attempt, counts the records that did not reach the
    /// destination, and empties the batch either way: nothing is retried, so nothing is
    /// counted twice.
    fn write_batch(&mut self) {
        if self.ends.is_empty() {
            self.batch.clear();
            return;
        }
        let (written, result) = write_counted(&mut self.out, &self.batch);
        // What a failed flush held is unknown: count the whole batch as lost. (Stdout and
        // files hold nothing: stdout's line buffer passes newline-ended writes straight on.)
        let (delivered, result) = match result.and_then(|()| self.out.flush()) {
            Ok(()) => (self.ends.len(), Ok(())),
            Err(e) if written == self.batch.len() => (0, Err(e)),
            Err(e) => (self.ends.partition_point(|&end| end <= written), Err(e)),
        };
        let lost = (self.ends.len() - delivered) as u64;
        match result {
            Ok(()) => {
                self.torn = false;
                if let Some(lost) = self.burst.take() {
                    tracing::warn!(path = %self.dest, lost, "access log writing again");
                }
            }
            Err(error) => {
                self.lost.inc_by(lost);
                if written > 0 {
                    // Cut inside a record (not at a record's end, nor right after the
                    // leading newline of a previous cut)?
                    let lead = usize::from(self.batch.first() == Some(&b'\n'));
                    self.torn = written != lead && self.ends.binary_search(&written).is_err();
                }
                match &mut self.burst {
                    Some(n) => *n += lost,
                    None => {
                        tracing::error!(
                            path = %self.dest,
                            %error,
                            lost,
                            "access log write failed; records are dropped and counted in \
                             sidecar_access_log_dropped_total{{reason=\"write_error\"}} until it writes again"
                        );
                        self.burst = Some(lost);
                    }
                }
            }
        }
        self.batch.clear();
        self.ends.clear();
    }
}

/// `write_all` that also says how many bytes went out before an error.
fn write_counted(out: &mut impl Write, mut buf: &[u8]) -> (usize, io::Result<()>) {
    let mut written = 0;
    while !buf.is_empty() {
        match out.write(buf) {
            Ok(0) => return (written, Err(io::ErrorKind::WriteZero.into())),
            Ok(n) => {
                written += n;
                buf = buf.get(n..).unwrap_or_default();
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return (written, Err(e)),
        }
    }
    (written, Ok(()))
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(in crate::telemetry::access_log) fn record() -> AccessRecord {
        AccessRecord {
            start: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            direction: "inbound",
            listener: "web".into(),
            method: Method::POST,
            path: "/a?b=1".into(),
            version: Version::HTTP_11,
            status: 201,
            duration: Duration::from_micros(1500),
            bytes_in: 3,
            bytes_out: 4,
            peer: "127.0.0.1:5555".parse().unwrap(),
            peer_identity: None,
            trace_id: Some(0x4bf92f3577b34da6a3ce929d0e0e4736),
            error: None,
            upstream: None,
        }
    }

    /// A destination that refuses the next `fail` writes (a full disk), after accepting
    /// `accept` bytes of the first one if set (a short write).
    #[derive(Default)]
    struct Flaky {
        out: Vec<u8>,
        fail: usize,
        accept: Option<usize>,
        writes: usize,
    }

    impl Write for Flaky {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.writes += 1;
            if let Some(n) = self.accept.take() {
                self.out.extend_from_slice(&buf[..n]);
                return Ok(n);
            }
            if self.fail > 0 {
                self.fail -= 1;
                return Err(io::Error::new(io::ErrorKind::StorageFull, "no space left on device"));
            }
            self.out.extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn batch(w: &mut Writer<Flaky>, records: usize) {
        for _ in 0..records {
            w.push(&record());
        }
        w.write_batch();
    }

    fn exposition(registry: &Registry) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, registry).unwrap();
        out
    }

    const QUEUE_FULL: &str = "sidecar_access_log_dropped_total{reason=\"queue_full\"}";
    const WRITE_ERROR: &str = "sidecar_access_log_dropped_total{reason=\"write_error\"}";

    #[test]
    fn both_reasons_exist_at_zero_before_the_first_loss() {
        let mut registry = Registry::with_prefix("sidecar");
        let config = AccessLogConfig {
            enabled: false,
            format: crate::config::LogFormat::Json,
            path: AccessLogPath::Stdout,
        };
        let log = AccessLog::start(&config, &mut registry).unwrap();
        assert!(!log.enabled());
        let out = exposition(&registry);
        assert!(out.contains(&format!("{QUEUE_FULL} 0")), "{out}");
        assert!(out.contains(&format!("{WRITE_ERROR} 0")), "{out}");
    }

    #[test]
    fn a_full_queue_is_counted_as_queue_full() {
        let mut registry = Registry::with_prefix("sidecar");
        let (queue_full, write_error) = register(&mut registry);
        // A writer that never reads: the queue holds one record, the next two are dropped.
        let (tx, _rx) = mpsc::channel(1);
        let log = AccessLog { tx: Some(tx), queue_full, write_error };
        for _ in 0..3 {
            log.log(record());
        }
        let out = exposition(&registry);
        assert!(out.contains(&format!("{QUEUE_FULL} 2")), "{out}");
        assert!(out.contains(&format!("{WRITE_ERROR} 0")), "{out}");
    }

    #[test]
    fn write_errors_are_counted_once_and_the_writer_recovers() {
        let mut registry = Registry::with_prefix("sidecar");
        let (queue_full, write_error) = register(&mut registry);
        let mut w = Writer::new(Flaky::default(), LogFormat::Json, "test".into(), write_error.clone());

        batch(&mut w, 2);
        assert_eq!(write_error.get(), 0);
        // The disk fills: two batches (3 and 2 records) fail, one write attempt each.
        w.out.fail = 2;
        batch(&mut w, 3);
        assert_eq!(write_error.get(), 3);
        assert_eq!(w.burst, Some(3));
        batch(&mut w, 2);
        assert_eq!(write_error.get(), 5);
        assert_eq!(w.out.writes, 3, "one write attempt per batch");
        // Space again: the next batch is written, and the lost ones are not counted again.
        batch(&mut w, 1);
        assert_eq!(w.out.writes, 4);
        assert_eq!(w.burst, None);
        batch(&mut w, 1);
        assert_eq!(write_error.get(), 5);
        assert_eq!(queue_full.get(), 0);

        let text = std::str::from_utf8(&w.out.out).unwrap();
        assert_eq!(text.lines().count(), 4, "{text}");
        for line in text.lines() {
            serde_json::from_str::<serde_json::Value>(line).unwrap();
        }
        let out = exposition(&registry);
        assert!(out.contains(&format!("{WRITE_ERROR} 5")), "{out}");
        assert!(out.contains(&format!("{QUEUE_FULL} 0")), "{out}");
    }

    #[test]
    fn a_short_write_counts_only_the_records_it_did_not_deliver() {
        let lost = Counter::default();
        let mut w = Writer::new(Flaky::default(), LogFormat::Json, "test".into(), lost.clone());
        let mut one = Vec::new();
        format::json(&mut one, &mut format::Stamps::default(), &record()).unwrap();

        // The first record and part of the second go out, then the disk is full.
        w.out.accept = Some(one.len() + 10);
        w.out.fail = 1;
        batch(&mut w, 3);
        assert_eq!(lost.get(), 2);
        assert!(w.torn);

        batch(&mut w, 1);
        assert_eq!(lost.get(), 2);
        assert!(!w.torn);
        // The cut record is a broken line of its own; the next record starts a new line.
        let text = std::str::from_utf8(&w.out.out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(lines[1].len(), 10);
        for line in [lines[0], lines[2]] {
            serde_json::from_str::<serde_json::Value>(line).unwrap();
        }
    }
}
